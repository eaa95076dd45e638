"""R lazy-load reading, HTML prose extraction and the text builder (lcompress.integrations.texts).

The R files here are written by a small XDR encoder of this module's own, from R's serialization format
(R Internals, "Serialization Formats"), not by the reader under test."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from lcompress.integrations import texts as T

# ------------------------------------------------------------------------------------------ an XDR encoder

NA_INT = -(2**31)


def i32(v: int) -> bytes:
    return struct.pack(">i", v)


def flags(t: int, *, obj: bool = False, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    return i32(t | (obj << 8) | (attr << 9) | (tag << 10) | (levels << 12))


NIL = i32(254)


def header(version: int = 3, encoding: str = "UTF-8") -> bytes:
    h = b"X\n" + i32(version) + i32(0x040201) + i32(0x030500)
    if version == 3:
        h += i32(len(encoding)) + encoding.encode()
    return h


def charsxp(s: str | None, enc: str = "utf8") -> bytes:
    if s is None:
        return flags(9) + i32(-1)
    b = s.encode("latin-1" if enc == "latin1" else "utf-8")
    levels = {"utf8": 1 << 3, "latin1": 1 << 2, "ascii": 1 << 6, "native": 0}[enc]
    return flags(9, levels=levels) + i32(len(b)) + b


def sym(name: str) -> bytes:
    return flags(1) + charsxp(name, "ascii")


def pairlist(cells: list[tuple[str | None, bytes]], code: int = 2) -> bytes:
    out = b""
    for tag, value in cells:
        out += flags(code, tag=tag is not None) + (sym(tag) if tag is not None else b"") + value
    return out + NIL


def attrs_of(attrs: dict[str, bytes] | None) -> bytes:
    return pairlist(list(attrs.items())) if attrs else b""


def strsxp(values: list[str | None], attrs: dict[str, bytes] | None = None, enc: str = "utf8") -> bytes:
    return (flags(16, attr=bool(attrs)) + i32(len(values)) + b"".join(charsxp(v, enc) for v in values)
            + attrs_of(attrs))


def intsxp(values: list[int], attrs: dict[str, bytes] | None = None, code: int = 13) -> bytes:
    return flags(code, attr=bool(attrs)) + i32(len(values)) + b"".join(i32(v) for v in values) + attrs_of(attrs)


def lglsxp(values: list[int], attrs: dict[str, bytes] | None = None) -> bytes:
    return intsxp(values, attrs, code=10)


def realsxp(values: list[float], attrs: dict[str, bytes] | None = None) -> bytes:
    return (flags(14, attr=bool(attrs)) + i32(len(values)) + b"".join(struct.pack(">d", v) for v in values)
            + attrs_of(attrs))


def vecsxp(items: list[bytes], attrs: dict[str, bytes] | None = None) -> bytes:
    return flags(19, attr=bool(attrs)) + i32(len(items)) + b"".join(items) + attrs_of(attrs)


def named_list(d: dict[str, bytes]) -> bytes:
    return vecsxp(list(d.values()), {"names": strsxp(list(d))})


def altrep_intseq(n: float, start: float, step: float) -> bytes:
    info = pairlist([(None, sym("compact_intseq")), (None, sym("base")), (None, intsxp([13]))])
    return flags(238) + info + realsxp([n, start, step]) + NIL


def write_lazyload(base: Path, objects: dict[str, bytes], version: int = 3) -> None:
    """BASE.rdb: each object zlib-compressed behind its 4-byte big-endian length; BASE.rdx: the gzipped index
    list(variables = list(NAME = c(offset, length)), references = list(), compressed = TRUE)."""
    rdb, keys = b"", {}
    for name, body in objects.items():
        stream = header(version) + body
        blob = struct.pack(">I", len(stream)) + zlib.compress(stream)
        keys[name] = intsxp([len(rdb), len(blob)])
        rdb += blob
    index = named_list({"variables": named_list(keys), "references": vecsxp([], {"names": strsxp([])}),
                        "compressed": lglsxp([1])})
    base.with_name(base.name + ".rdb").write_bytes(rdb)
    base.with_name(base.name + ".rdx").write_bytes(gzip.compress(header(version) + index))


# --------------------------------------------------------------------------------------------- unserialize


def test_vectors_read_back_exactly():
    obj = named_list({
        "s": strsxp(["a", None, "", "naïve"]),
        "l": strsxp(["café"], enc="latin1"),
        "i": intsxp([1, NA_INT, -7, 2**31 - 1]),
        "d": realsxp([0.5, -1e300, float("inf")]),
        "b": lglsxp([1, 0, NA_INT]),
        "n": NIL,
        "p": pairlist([("x", intsxp([3])), (None, strsxp(["y"]))]),
    })
    r = T.unserialize(header() + obj)
    assert r.type == "list" and r.names == ["s", "l", "i", "d", "b", "n", "p"]
    assert r["s"].data == ["a", None, "", "naïve"]
    assert r["l"].data == ["café"]
    assert r["i"].type == "integer" and r["i"].data.tolist() == [1, NA_INT, -7, 2**31 - 1]
    assert r["d"].type == "double" and r["d"].data.tolist() == [0.5, -1e300, float("inf")]
    assert r["b"].type == "logical" and r["b"].data.tolist() == [1, 0, NA_INT]
    assert r["n"] is None
    assert r["p"].type == "pairlist" and [t for t, _ in r["p"].data] == ["x", None]
    assert r["p"].data[0][1].data.tolist() == [3] and r["p"].data[1][1].data == ["y"]


def test_version_2_and_native_encoding():
    r = T.unserialize(header(2) + strsxp(["plain"], enc="native"))
    assert r.data == ["plain"]
    latin1 = "déjà".encode("latin-1")
    r = T.unserialize(header(3, "latin1") + flags(16) + i32(1) + flags(9) + i32(len(latin1)) + latin1)
    assert r.data == ["déjà"]


def test_data_frame_with_compact_row_names():
    df = vecsxp([strsxp(["x", "y", "z"]), intsxp([1, 2, 3])],
                {"names": strsxp(["text", "n"]), "class": strsxp(["tbl_df", "tbl", "data.frame"]),
                 "row.names": intsxp([NA_INT, -3])})
    r = T.unserialize(header() + df)
    assert r.classes == ["tbl_df", "tbl", "data.frame"]
    assert r["text"].data == ["x", "y", "z"] and r["n"].data.tolist() == [1, 2, 3]
    assert r.attributes["row.names"].data.tolist() == [NA_INT, -3]


def test_symbol_references_and_attributes_on_vectors():
    # a list whose two elements carry a "names" attribute; the second names symbol is written as REFSXP 1
    first = flags(13, attr=True) + i32(1) + i32(5) + flags(2, tag=True) + sym("names") + strsxp(["a"]) + NIL
    second = (flags(13, attr=True) + i32(1) + i32(6) + flags(2, tag=True) + i32(255 | (1 << 8)) + strsxp(["b"])
              + NIL)
    r = T.unserialize(header() + vecsxp([first, second]))
    assert r.data[0].names == ["a"] and r.data[1].names == ["b"] and r.data[1].data.tolist() == [6]


def test_altrep_compact_sequence():
    r = T.unserialize(header() + altrep_intseq(5, 3, 2))
    assert r.type == "integer" and r.data.tolist() == [3, 5, 7, 9, 11]


def test_empty_and_long_pairlist_without_recursion():
    cells = [(f"t{i}", intsxp([i])) for i in range(5000)]  # deeper than Python's recursion limit if recursive
    r = T.unserialize(header() + pairlist(cells))
    assert len(r.data) == 5000 and r.data[-1][0] == "t4999" and r.data[-1][1].data.tolist() == [4999]


# ------------------------------------------------------------------------------------------ hostile input

SAMPLE = header() + named_list({"s": strsxp(["ab", None]), "i": intsxp([1, 2]), "d": realsxp([1.5]),
                                "df": vecsxp([strsxp(["q"])], {"names": strsxp(["c"]),
                                                               "class": strsxp(["data.frame"]),
                                                               "row.names": intsxp([NA_INT, -1])})})


def test_every_truncation_is_a_value_error():
    for n in range(len(SAMPLE)):
        with pytest.raises(ValueError):
            T.unserialize(SAMPLE[:n], source="sample.rds")


def test_trailing_bytes_and_foreign_formats():
    with pytest.raises(ValueError, match="bytes after the object"):
        T.unserialize(SAMPLE + b"\0")
    with pytest.raises(ValueError, match="ASCII"):
        T.unserialize(b"A\n2\n")
    with pytest.raises(ValueError, match="version 4"):
        T.unserialize(b"X\n" + i32(4) + i32(0) + i32(0) + NIL)


@pytest.mark.parametrize("body, match", [
    (flags(16) + i32(2**31 - 1), "length 2147483647 needs at least"),  # nothing allocated for it
    (flags(14) + i32(-1) + i32(2**31 - 1) + i32(0), "long length|needs at least"),
    (flags(19) + i32(-5), "negative length"),
    (flags(13) + i32(1000) + i32(1), "needs at least 4000 bytes"),
    (flags(16) + i32(1) + flags(13) + i32(1) + i32(0), "not CHARSXP"),
    (flags(16) + i32(1) + flags(9) + i32(1 << 30), "truncated: a string"),
    (i32(255 | (7 << 8)), "reference 7"),
    (flags(21), "unsupported R object type 21 \\(bytecode\\)"),
    (flags(200), "unsupported R object type 200"),
    (altrep_intseq(1e12, 1, 1), "ALTREP compact_intseq of length"),
    (altrep_intseq(3, 2**31 - 2, 1), "leaves the integer range"),
    (flags(238) + pairlist([(None, sym("mystery")), (None, sym("pkg")), (None, intsxp([13]))]) + NIL + NIL,
     "unsupported ALTREP class 'mystery'"),
    (strsxp(["x"]).replace(b"\x00\x00\x00\x01x", b"\x00\x00\x00\x01\xff"), "not valid utf-8"),
    (flags(2, tag=True) + intsxp([1]) + NIL + NIL, "tag is a integer"),
])
def test_malformed_streams_raise_value_errors_naming_the_source(body, match):
    with pytest.raises(ValueError, match=match) as e:
        T.unserialize(header() + body, source="evil.rds")
    assert str(e.value).startswith("evil.rds: ")


def test_deep_nesting_is_bounded():
    body = flags(19) + i32(1)
    deep = body * 10_000 + NIL
    with pytest.raises(ValueError, match="nested deeper than"):
        T.unserialize(header() + deep)


def test_random_corruption_never_escapes_as_another_error():
    rng = random.Random(0)
    for _ in range(3000):
        b = bytearray(SAMPLE)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            T.unserialize(bytes(b))
        except ValueError:
            pass


# ------------------------------------------------------------------------------------------- lazy-load DB


def test_lazyload_db_round_trip(tmp_path):
    base = tmp_path / "Rdata"
    objs = {"emma": strsxp(["EMMA", "", "Emma Woodhouse, handsome,", "clever, and rich.", "", "CHAPTER I"]),
            "nums": realsxp([1.0, 2.5]),
            "df": vecsxp([strsxp(["x"]), intsxp([7])], {"names": strsxp(["text", "n"]),
                                                      "class": strsxp(["data.frame"]),
                                                      "row.names": intsxp([NA_INT, -1])})}
    write_lazyload(base, objs)
    for p in (base, base.with_suffix(".rdx"), base.with_suffix(".rdb")):
        db = T.read_lazyload_db(p)
        assert list(db) == ["emma", "nums", "df"]
    assert db["emma"].data[2] == "Emma Woodhouse, handsome,"
    assert db["nums"].data.tolist() == [1.0, 2.5]
    assert db["df"]["n"].data.tolist() == [7]
    assert list(T.read_lazyload_db(base, names=["nums"])) == ["nums"]
    with pytest.raises(ValueError, match="no variable 'nope'"):
        T.read_lazyload_db(base, names=["nope"])
    write_lazyload(base, objs, version=2)
    assert T.read_lazyload_db(base)["emma"].data[0] == "EMMA"


def test_lazyload_db_damaged_files(tmp_path):
    base = tmp_path / "Rdata"
    write_lazyload(base, {"a": strsxp(["hello"] * 50), "b": intsxp([1, 2, 3])})
    rdb = base.with_suffix(".rdb")
    good = rdb.read_bytes()
    rdb.write_bytes(good[:-10])  # the last object runs past the end
    with pytest.raises(ValueError, match=r"Rdata\.rdb \(variable 'b'\): bytes .* lie outside"):
        T.read_lazyload_db(base)
    rdb.write_bytes(good[:4] + b"\xff" * (len(good) - 4))  # corrupt zlib
    with pytest.raises(ValueError, match="variable 'a'.*zlib"):
        T.read_lazyload_db(base, names=["a"])
    rdb.write_bytes(b"\xff\xff\xff\xff" + good[4:])  # declares 4 GB from a few bytes
    with pytest.raises(ValueError, match="declares 4294967295 uncompressed bytes"):
        T.read_lazyload_db(base, names=["a"])
    rdb.unlink()
    with pytest.raises(FileNotFoundError, match="Rdata.rdb"):
        T.read_lazyload_db(base)
    rdx = base.with_suffix(".rdx")
    rdx.write_bytes(rdx.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"Rdata\.rdx: the gzip stream is corrupt or truncated"):
        T.read_lazyload_db(base)
    rdx.write_bytes(gzip.compress(header() + strsxp(["not an index"])))
    with pytest.raises(ValueError, match="not a lazy-load index"):
        T.read_lazyload_db(base)
    rdx.write_bytes(gzip.compress(header() + named_list({
        "variables": named_list({"a": intsxp([-4, 10])}), "compressed": lglsxp([1])})))
    with pytest.raises(ValueError, match="not two non-negative integers"):
        T.read_lazyload_db(base)


# ------------------------------------------------------------------------------------------------- HTML


def test_html_paragraphs_keeps_prose_only():
    page = """<html><head><title>6.2. apt</title><script>var x = "<p>no</p>";</script><style>p{}</style></head>
    <body><div id="banner"><a href="#">Download the ebook</a></div>
    <ul class="docnav top"><li class="previous"><a href="a.html"><strong>Prev</strong></a></li></ul>
    <div class="section"><div class="titlepage"><h2 class="title">6.2. Commands</h2></div>
    <div class="para">
        <acronym>APT</acronym> is a <em>vast</em> project;   run
        <code class="command">apt&nbsp;update</code> &amp; wait.
    </div>
    <div class="para">Before the listing:<pre class="screen"><code>$ apt update\nHit:1 http://deb</code></pre>
    after it.</div>
    <div class="example"><div class="para">An example's caption</div></div>
    <div class="para">A list follows<div class="itemizedlist"><ul><li><div class="para">first item</div></li>
    </ul></div></div>
    <p>A plain paragraph<br/>with a break.</p><p>   </p>
    <table><tr><td><p>cell</p></td></tr></table>
    </div><ul class="docnav"><li class="home">The Debian Administrator's Handbook</li></ul></body></html>"""
    assert T.html_paragraphs(page) == [
        "APT is a vast project; run apt update & wait.",
        "Before the listing:",
        "after it.",
        "A list follows",
        "first item",
        "A plain paragraph with a break.",
    ]


def test_html_paragraphs_tolerates_broken_markup():
    assert T.html_paragraphs("<p>one <b>two</p></i> three<p>four") == ["one two", "four"]
    assert T.html_paragraphs("") == []


# ----------------------------------------------------------------------------------------------- builder


NOVEL_LINES = {name: [title.upper(), "", "CHAPTER 1", "", f"The first line of {title},", "and its second line.", "",
                      f"A closing paragraph of {title}."] for name, title in T.AUSTEN_NOVELS.items()}


def fake_packages(tmp_path: Path) -> tuple[Path, Path]:
    austen = tmp_path / "r-cran-janeaustenr"
    data = austen / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    (austen / "usr/share/doc/r-cran-janeaustenr").mkdir(parents=True)
    (austen / "usr/share/doc/r-cran-janeaustenr/changelog.Debian.gz").write_bytes(
        gzip.compress(b"r-cran-janeaustenr (1.0.0-1) unstable; urgency=medium\n"))
    write_lazyload(data / "Rdata", {n: strsxp(lines) for n, lines in NOVEL_LINES.items()})
    html = tmp_path / "debian-handbook/usr/share/doc/debian-handbook/html/en-US"
    html.mkdir(parents=True)
    (html / "index.html").write_text('<link rel="next" href="b.html" /><div class="para">Index page prose '
                                     'about Debian packages.</div>')
    (html / "b.html").write_text('<div class="para">Second page: apt and dpkg work together.</div>'
                                 '<pre class="programlisting">apt-get install x</pre><p>Too short.</p>')
    (html / "a.html").write_text('<p>A page off the chain comes last in the text.</p>')
    return tmp_path / "debian-handbook", austen


def test_austen_paragraphs():
    assert T.austen_paragraphs(["T", "", "", "a", " b ", None, "c"]) == ["T", "a b", "c"]


def test_build_texts_disjoint_sources(tmp_path):
    handbook, austen = fake_packages(tmp_path)
    out = tmp_path / "texts"
    m = T.build_texts(handbook, austen, out, eval_novel="persuasion")
    eval_text = (out / "eval.txt").read_text()
    calib = (out / "calib.txt").read_text()
    assert eval_text == ("PERSUASION\n\nCHAPTER 1\n\nThe first line of Persuasion, and its second line.\n\n"
                         "A closing paragraph of Persuasion.\n")
    assert "Persuasion" not in calib
    for n, title in T.AUSTEN_NOVELS.items():
        if n != "persuasion":
            assert f"The first line of {title}, and its second line." in calib
    hb = calib.split("\n\n\n")[-1]
    assert hb == ("Index page prose about Debian packages.\n\nSecond page: apt and dpkg work together.\n\n"
                  "A page off the chain comes last in the text.\n")
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["eval"]["sources"][0]["name"] == "austen:persuasion"
    assert [s["name"] for s in m["calib"]["sources"]] == [f"austen:{n}" for n in T.AUSTEN_NOVELS
                                                         if n != "persuasion"] + ["debian-handbook:en-US"]
    assert m["calib"]["bytes"] == len(calib.encode()) and m["eval"]["characters"] == len(eval_text)
    assert m["eval"]["sha256"] == hashlib.sha256(eval_text.encode()).hexdigest()
    assert m["packages"] == {"r-cran-janeaustenr": "1.0.0-1", "debian-handbook": None}

    T.build_texts(None, austen, out, eval_novel="emma", calib_novels=["persuasion"], handbook=False)
    assert (out / "calib.txt").read_text() == "\n\n".join(T.austen_paragraphs(NOVEL_LINES["persuasion"])) + "\n"


@pytest.mark.parametrize("kwargs, match", [
    ({"eval_novel": "ulysses"}, "eval_novel='ulysses'"),
    ({"eval_novel": "emma", "calib_novels": ["emma"]}, "must be disjoint"),
    ({"calib_novels": ["dracula"]}, "calib_novels contains 'dracula'"),
    ({"calib_novels": [], "handbook": False}, "no calibration source"),
])
def test_build_texts_bad_arguments(tmp_path, kwargs, match):
    handbook, austen = fake_packages(tmp_path)
    with pytest.raises(ValueError, match=match):
        T.build_texts(handbook, austen, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_build_texts_missing_packages(tmp_path):
    with pytest.raises(FileNotFoundError, match="austen_dir=.*janeaustenr/data/Rdata.rdx"):
        T.build_texts(None, tmp_path, tmp_path / "out", handbook=False)
    _, austen = fake_packages(tmp_path)
    with pytest.raises(FileNotFoundError, match="handbook_dir=.*html/en-US/index.html"):
        T.build_texts(tmp_path / "nowhere", austen, tmp_path / "out")


def test_build_texts_script(tmp_path, capsys):
    handbook, austen = fake_packages(tmp_path)
    spec = importlib.util.spec_from_file_location("build_texts_script",
                                                  Path(__file__).parent.parent / "scripts" / "build_texts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--out", str(tmp_path / "t"), "--austen-dir", str(austen), "--handbook-dir", str(handbook),
                   "--eval-novel", "emma"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval"]["sources"][0]["name"] == "austen:emma"
    assert (tmp_path / "t" / "calib.txt").is_file()
    rc = mod.main(["--out", str(tmp_path / "u"), "--debs", str(tmp_path / "empty"), "--no-handbook"])
    assert rc == 2 and "r-cran-janeaustenr: not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the real package

REAL = Path(__file__).parent.parent / "data" / "debs" / "r-cran-janeaustenr"


@pytest.mark.skipif(not (REAL / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx").is_file(),
                    reason="r-cran-janeaustenr not extracted under data/debs (scripts/build_texts.py --download)")
def test_real_janeaustenr_database():
    db = T.read_lazyload_db(T.find_austen_dir(REAL) / "data" / "Rdata")
    assert sorted(db) == sorted(T.AUSTEN_NOVELS)
    assert db["emma"].data[:3] == ["EMMA", "", "By Jane Austen"]
    assert len(db["emma"].data) == 16235 and len(db["persuasion"].data) == 8328
    assert any(line.startswith("It is a truth universally acknowledged") for line in db["prideprejudice"].data[:20])
