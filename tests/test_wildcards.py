"""Wildcards and array prompts: upstream's rules (random.Random(image seed), one draw per
placeholder in order, nested rounds, read in order; arrays by image index)."""

import random

from modules import config, wildcards
from modules.wildcards import WildcardFolder, apply_arrays, apply_wildcards

COLORS = ["crimson", "teal", "", "ochre", "  "]       # the empty line never counts; spaces do


def folder_with(tmp_path, **files):
    for name, lines in files.items():
        path = tmp_path / "wildcards" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines), encoding="utf-8")
    return WildcardFolder(tmp_path / "wildcards")


def test_each_placeholder_draws_from_the_images_own_seed_in_order(tmp_path):
    folder = folder_with(tmp_path, color=COLORS)
    counted = [c for c in COLORS if c != ""]
    for seed in (7, 8, 12345):
        oracle = random.Random(seed)
        first, second = oracle.choice(counted), oracle.choice(counted)
        text = apply_wildcards("a __color__ cat on a __color__ rug", random.Random(seed), 0, False, folder)
        assert text == f"a {first} cat on a {second} rug"


def test_read_in_order_takes_line_index_mod_count(tmp_path):
    folder = folder_with(tmp_path, color=COLORS)
    counted = [c for c in COLORS if c != ""]
    got = [apply_wildcards("__color__", random.Random(0), i, True, folder) for i in range(6)]
    assert got == [counted[i % len(counted)] for i in range(6)]


def test_nested_wildcards_resolve_in_later_rounds_and_a_loop_stops(tmp_path):
    folder = folder_with(tmp_path, scene=["__color__ sky", "plain field"], color=["red", "blue"],
                         loop=["again __loop__"])
    oracle = random.Random(3)
    scene = oracle.choice(["__color__ sky", "plain field"])
    expected = scene.replace("__color__", oracle.choice(["red", "blue"])) if "__" in scene else scene
    assert apply_wildcards("under a __scene__", random.Random(3), 0, False, folder) == f"under a {expected}"
    looped = apply_wildcards("__loop__", random.Random(0), 0, False, folder)
    assert looped == "again " * wildcards.MAX_ROUNDS + "__loop__"


def test_a_missing_or_empty_file_leaves_the_plain_word_and_subfolders_are_found(tmp_path):
    folder = folder_with(tmp_path, empty=[""], **{"deep/animal": ["heron"]})
    assert apply_wildcards("__nothing__ and __empty__", random.Random(0), 0, False, folder) == "nothing and empty"
    assert apply_wildcards("a __animal__", random.Random(0), 0, False, folder) == "a heron"


def test_arrays_walk_through_every_combination_first_array_fastest():
    text = "[[red, blue]] [[cat,dog,fox]]"
    # Items are taken as written (" blue" keeps its space), as upstream splits them.
    expected = ["red cat", " blue cat", "red dog", " blue dog", "red fox", " blue fox", "red cat"]
    assert [apply_arrays(text, i) for i in range(7)] == expected
    assert apply_arrays("no arrays here", 5) == "no arrays here"


def test_shipped_wildcards_resolve_without_unknown_names():
    folder = WildcardFolder(config.REPO_ROOT / "wildcards")
    assert len(folder.files) >= 5
    for name in folder.files:
        for seed in range(5):
            text = apply_wildcards(f"__{name}__", random.Random(seed), seed, False, folder)
            assert "__" not in text and text.strip(), (name, text)
