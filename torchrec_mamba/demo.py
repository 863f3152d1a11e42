"""Placeholder demo; replaced by the RetailRocket example."""


def main() -> None:
    print("demo placeholder")


if __name__ == "__main__":
    main()
