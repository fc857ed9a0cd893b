"""SizedCache: an ordered cache that keeps its byte count as entries come and go."""

from ldm_patched.modules.sized_cache import SizedCache


def test_the_total_follows_puts_replacements_and_drops_measuring_each_entry_once():
    measured = []
    cache = SizedCache(lambda value: measured.append(value) or len(value))
    cache["a"], cache["b"], cache["c"] = "xx", "yyy", "z"
    cache["a"] = "xxxxx"                       # a replaced entry is measured again, the old size dropped
    assert cache.nbytes() == 5 + 3 + 1 and cache.size_of("a") == 5
    cache.move_to_end("b", last=False)
    assert cache.popitem(last=False) == ("b", "yyy") and cache.nbytes() == 6
    del cache["c"]
    assert cache.pop("a") == "xxxxx" and cache.nbytes() == 0 and len(cache) == 0
    cache["d"] = "dd"
    cache.clear()
    assert cache.nbytes() == 0 and "d" not in cache
    assert measured == ["xx", "yyy", "z", "xxxxx", "dd"]   # never on a query
