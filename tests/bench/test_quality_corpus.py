"""bench/quality/corpus.py: the four-way split of the installed code, file by file, with no held-out text
on the training side."""

import json

import pytest
from quality import corpus

from codetune.config import ConfigError


def _package(root, name, files: dict[str, str]):
    for rel, text in files.items():
        p = root / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / name


def _code(i: int) -> str:
    return f"def f{i}(x):\n    return x + {i}\n" + "# padding line of a real module\n" * 10


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    shared = _code(999)
    pkgs = {
        "dom": _package(root, "dom", {f"sub{i % 3}/m{i}.py": _code(i) for i in range(30)} | {"vendored.py": shared}),
        "alpha": _package(root, "alpha", {f"a{i}.py": _code(100 + i) for i in range(20)} | {"copy_of_dom.py": shared,
                                                                                           "tiny.py": "x = 1\n"}),
        "beta": _package(root, "beta", {f"b/{i}.py": _code(200 + i) for i in range(20)}),
        "small": _package(root, "small", {"s.py": _code(300)}),
    }
    return pkgs


def spec(**kw):
    base = dict(domain="dom", min_package_bytes=2000, max_package_bytes=None, max_domain_bytes=None, domain_parts=(),
                max_general_bytes=None, general_test_fraction=0.2, domain_test_fraction=0.25)
    return corpus.CorpusSpec(**{**base, **kw})


def test_choose_finds_the_domain_and_the_packages_big_enough(site):
    domain, general = corpus.choose(spec(), site)
    assert domain.name == "dom" and len(domain.files) == 31
    assert [p.name for p in general] == ["alpha", "beta"]  # largest first; `small` is under min_package_bytes
    assert all(f.rel != "tiny.py" for f in general[0].files)  # under MIN_FILE_BYTES


def test_an_unknown_domain_is_one_line_naming_the_fix(site):
    with pytest.raises(ConfigError, match="--domain nope: not installed here; choose an installed package"):
        corpus.choose(spec(domain="nope"), site)


def test_caps_take_a_stable_hash_sample_and_domain_parts_restrict(site):
    domain, _ = corpus.choose(spec(max_domain_bytes=3000), site)
    again, _ = corpus.choose(spec(max_domain_bytes=3000), site)
    assert 0 < domain.size <= 3000 and [f.key for f in domain.files] == [f.key for f in again.files]
    part, _ = corpus.choose(spec(domain_parts=("sub1",)), site)
    assert part.files and all(f.rel.startswith("sub1/") for f in part.files)


def test_split_reaches_the_fraction_keeps_copies_together_and_forces_task_files(site):
    domain, general = corpus.choose(spec(), site)
    kept, dropped = corpus.general_files(domain, general)
    assert dropped == 1 and all(f.rel != "copy_of_dom.py" for f in kept)  # a domain file never trains in general
    forced = frozenset({"dom/sub0/m3.py"})
    train, test = corpus.split(list(domain.files), 0.25, forced)
    assert {f.key for f in train}.isdisjoint({f.key for f in test}) and len(train) + len(test) == 31
    assert "dom/sub0/m3.py" in {f.key for f in test}
    share = sum(f.size for f in test) / sum(f.size for f in domain.files)
    assert 0.25 <= share < 0.25 + 2 * max(f.size for f in domain.files) / sum(f.size for f in domain.files)
    assert corpus.split(list(domain.files), 0.25, forced) == (train, test)  # deterministic
    dup = [f for f in domain.files if f.rel == "sub0/m3.py"][0]
    twin = corpus.SourceFile("dom", "zz/twin.py", dup.path, dup.size, dup.digest)
    _, test2 = corpus.split([*domain.files, twin], 0.25, forced)
    assert "dom/zz/twin.py" in {f.key for f in test2}  # an identical copy goes where its original goes
    assert corpus.split(list(domain.files), 0.99)[0]  # training always keeps something


def test_build_writes_the_splits_and_their_record(site, tmp_path):
    domain, general = corpus.choose(spec(), site)
    c = corpus.build(spec(), tmp_path / "corpus", domain, general, frozenset({"alpha/a3.py"}), {"note.txt": "hi"})
    assert (tmp_path / "corpus" / "general-test" / "alpha" / "a3.py").is_file()
    assert not (tmp_path / "corpus" / "pretrain" / "alpha" / "a3.py").exists()
    assert c.sources("domain-train") == [str(tmp_path / "corpus" / "domain-train" / "dom")]
    info = json.loads((tmp_path / "corpus" / corpus.CORPUS_JSON).read_text())
    every = [k for name in corpus.SPLITS for k in info["files"][name]]
    assert len(every) == len(set(every)) and (tmp_path / "corpus" / "note.txt").read_text() == "hi"
    assert not any(p.name.startswith("corpus.tmp-") for p in tmp_path.iterdir())
