"""A small NVTabular operator used by the RetailRocket workflow (imports NVTabular on import).

merlin's executor re-runs a node once per downstream branch (it does not memoise), so splitting
the ``Groupby`` output into ``lists >> ListSlice`` and ``scalars`` runs the slow CPU ``Groupby``
twice or more. :class:`TailSlice` keeps the graph a single chain: it is ``ListSlice(-n)`` on the
list columns and passes the scalar columns through unchanged, with their schemas untouched.
It never pads (on CPU ``ListSlice(pad=True)`` silently fails to pad rows read back from parquet);
the loader pads.
"""

from __future__ import annotations

import warnings
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import numpy as np
    import pandas as pd
    from merlin.core.dispatch import is_cpu_object, is_list_dtype
    from merlin.dag import ColumnSelector
    from merlin.dag.operator import Operator
    from nvtabular.ops import ListSlice

__all__ = ["TailSlice"]


class TailSlice(ListSlice):
    """Keep the last ``n`` elements of every list column; pass other columns through.

    On pandas, NVTabular's ``Groupby`` list aggregation returns Python lists, which widens
    float32 values to float64 on the way to parquet; rows are returned as numpy arrays, float lists
    cast to ``float_dtype`` (cuDF keeps the element type itself).

    Args:
        n (int): elements kept per row (the last ones).
        float_dtype (str): element type of float list columns on pandas. Default: ``"float32"``.

    Example::

        >>> import pandas as pd, numpy as np
        >>> df = pd.DataFrame({"x": [np.array([1, 2, 3]), np.array([4])], "k": [7, 8]})
        >>> out = TailSlice(2).transform(ColumnSelector(["x", "k"]), df)
        >>> [v.tolist() for v in out["x"]], out["k"].tolist()
        ([[2, 3], [4]], [7, 8])
        >>> f = pd.DataFrame({"t": [[0.5, 1.5], [2.5, 3.5]]})
        >>> [v.dtype.name for v in TailSlice(1).transform(ColumnSelector(["t"]), f)["t"]]
        ['float32', 'float32']
    """

    def __init__(self, n: int, float_dtype: str = "float32") -> None:
        if n < 1:
            raise ValueError(f"TailSlice needs n >= 1, got {n}")
        super().__init__(-n)
        self.float_dtype = float_dtype

    def transform(self, col_selector: ColumnSelector, df: Any) -> Any:
        names = list(col_selector.names)
        lists = [c for c in names if is_list_dtype(df[c])]
        out = super().transform(ColumnSelector(lists), df)
        if is_cpu_object(out):
            for c in lists:
                rows = [np.asarray(v) for v in out[c]]
                if rows and rows[0].dtype.kind == "f":
                    rows = [r.astype(self.float_dtype) for r in rows]
                out[c] = pd.Series(rows, index=out.index, dtype=object)
        for c in names:
            if c not in lists:
                out[c] = df[c].values
        return out[names]

    transform.__doc__ = ListSlice.transform.__doc__

    @staticmethod
    def _input_is_list(input_schema: Any) -> bool:
        if not input_schema.column_schemas:
            return False
        return bool(input_schema[input_schema.column_names[0]].is_list)

    def _compute_tags(self, col_schema: Any, input_schema: Any) -> Any:
        if self._input_is_list(input_schema):
            return super()._compute_tags(col_schema, input_schema)
        tags = (
            input_schema[input_schema.column_names[0]].tags if input_schema.column_schemas else []
        )
        return col_schema.with_tags(tags)

    def _compute_properties(self, col_schema: Any, input_schema: Any) -> Any:
        if self._input_is_list(input_schema):
            return super()._compute_properties(col_schema, input_schema)
        return Operator._compute_properties(self, col_schema, input_schema)

    def _compute_shape(self, col_schema: Any, input_schema: Any) -> Any:
        if self._input_is_list(input_schema):
            return super()._compute_shape(col_schema, input_schema)
        return Operator._compute_shape(self, col_schema, input_schema)
