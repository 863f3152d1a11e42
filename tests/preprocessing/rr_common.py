"""Constants of the ETL tests: a handmade RetailRocket log (its ETL output is worked out by hand in
test_rr_etl.py) and the options of the two shared NVTabular runs."""

EVENTS_HEADER = "timestamp,visitorid,event,itemid,transactionid"
PROPS_HEADER = "timestamp,itemid,property,value"
TREE_HEADER = "categoryid,parentid"

MIN = 60_000
HANDMADE_EVENTS = [
    f"{0},1,view,10,",
    f"{1 * MIN},1,view,11,",
    f"{2 * MIN},1,addtocart,11,",
    f"{2 * MIN + 31 * MIN},1,view,12,",  # > 30 min later: a new session
    f"{3 * MIN + 31 * MIN},1,view,10,",
    "5,2,view,10,",  # visitor 2: a single-event session
]
HANDMADE_PROPS_1 = [
    "0,10,categoryid,100",
    "0,10,available,1",
    f"{30 * MIN},10,categoryid,101",  # item 10 moves to category 101 at minute 30
]
HANDMADE_PROPS_2 = [
    f"{200 * MIN},11,categoryid,102",  # only after item 11's events: earliest value applies
    "7,12,790,n300.000",  # item 12 is never categorised
]
HANDMADE_TREE = ["100,200", "101,200", "102,201", "200,", "201,"]

#: options of the two NVTabular runs shared by the tests
TIME_SPLIT = dict(world_size=2, num_shards=4, max_len=8)
LOO_SPLIT = dict(split="leave_one_out", group_by="visitor", world_size=3, max_len=6)
