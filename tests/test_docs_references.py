"""The docs name config keys, files, make targets and command-line options that exist.

Every dotted config key (``MODEL.DEFORMABLE_DETR.NUM_QUERIES``), repository path (``tools/demo.py``,
``configs/quickstart{,_plain}.yaml``), backticked ``make <target>`` and ``--flag`` written after
``tools/X.py`` / ``video/X.py`` in README.md, docs/*.md and video/README.md is checked against the config,
the tree, the Makefile and the argparse option strings of the code. Text only: no tool is imported or run.
"""
import glob
import itertools
import os
import re

import pytest

from ddetr_d2.config import build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
        "video/README.md"]  # fmt: skip

# Named on purpose although they are not in this tree / config; each with the reason.
NOT_OURS_PATHS = {
    "tools/deploy/export_model.py": "Detectron2's exporter, the anchor of ours",
    "configs/r50_motr_train.sh": "MOTR's training script, quoted for its defaults",
    "datasets/shapes": "an example output folder of make_synthetic_coco.py",
}
REMOVED_KEYS = {
    "INPUT.CLIP_LENGTH": "replaced by INPUT.CLIP_LENGTHS; docs/benchmarks.md keeps older runs' commands",
}
# detectron2's default_argument_parser, used by tools/train_net.py and video/train_net.py
DETECTRON2_FLAGS = {
    "--config-file", "--resume", "--eval-only", "--num-gpus", "--num-machines", "--machine-rank",
    "--dist-url",
}  # fmt: skip

# a whole key; a family written with a wildcard (``INPUT.CLIP_*``) is not one
KEY_RE = re.compile(
    r"(?<![\w.])((?:MODEL|SOLVER|INPUT|DATASETS|TEST|DATALOADER)(?:\.[A-Z][A-Z0-9_]*)+)(?![\w*])"
)
PATH_RE = re.compile(
    r"(?<![\w./-])((?:tools|video|configs|docs|ddetr_d2|tests|csrc|datasets)/[\w./*{},-]*[\w*}])"
)
MAKE_RE = re.compile(r"`make ([a-z][\w-]*)")
COMMAND_RE = re.compile(r"((?:tools|video)/\w+\.py)([^`\n]*)")
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def _read(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def _lines(doc):
    return enumerate(_read(doc).splitlines(), 1)


def _expand_braces(path):
    """``a{,_b}.yaml`` -> ``a.yaml``, ``a_b.yaml`` (shell brace expansion, non-nested)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _path_exists(path):
    for p in _expand_braces(path.rstrip(".,")):
        for cand in (p, os.path.join("video", p)):  # video/README.md names files relative to video/
            if glob.glob(os.path.join(ROOT, cand)):
                return True
    return False


def _config_has(cfg, key):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_config_keys_named_in_docs_exist():
    from ddetr_video.config import add_tracker_config

    cfg = build_cfg(add_config_fns=(add_tracker_config,), freeze=False)
    for key in REMOVED_KEYS:  # the allow-list stays honest
        assert not _config_has(cfg, key), f"{key} exists again: drop it from REMOVED_KEYS"
    missing, seen = [], 0
    for doc in DOCS:
        for lineno, line in _lines(doc):
            for key in KEY_RE.findall(line):
                seen += 1
                if not _config_has(cfg, key) and key not in REMOVED_KEYS:
                    missing.append(f"{doc}:{lineno}: {key}")
    assert seen > 100, f"only {seen} keys found: has the pattern stopped matching?"
    assert not missing, "config keys named in the docs that the config does not have:\n" + "\n".join(missing)


def test_paths_named_in_docs_exist():
    missing, seen = [], 0
    for doc in DOCS:
        for lineno, line in _lines(doc):
            for path in PATH_RE.findall(line):
                seen += 1
                if path.rstrip(".,") not in NOT_OURS_PATHS and not _path_exists(path):
                    missing.append(f"{doc}:{lineno}: {path}")
    assert seen > 100, f"only {seen} paths found: has the pattern stopped matching?"
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_make_targets_named_in_docs_exist():
    targets = set(re.findall(r"^([\w-]+):", _read("Makefile"), re.M))
    missing = [
        f"{doc}:{lineno}: make {t}"
        for doc in DOCS
        for lineno, line in _lines(doc)
        for t in MAKE_RE.findall(line)
        if t not in targets
    ]
    assert not missing, "make targets named in the docs that the Makefile lacks:\n" + "\n".join(missing)


def _option_strings():
    """Every ``"--flag"`` literal of the library (parsers built in ddetr_d2 / ddetr_video) and per tool."""
    lib = set()
    for p in glob.glob(os.path.join(ROOT, "ddetr_d2", "**", "*.py"), recursive=True) + glob.glob(
        os.path.join(ROOT, "video", "ddetr_video", "**", "*.py"), recursive=True
    ):
        with open(p, encoding="utf-8") as f:
            lib |= set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", f.read()))
    per_tool = {}
    for p in glob.glob(os.path.join(ROOT, "tools", "*.py")) + glob.glob(os.path.join(ROOT, "video", "*.py")):
        with open(p, encoding="utf-8") as f:
            per_tool[os.path.relpath(p, ROOT)] = set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", f.read()))
    return lib, per_tool


def test_command_line_options_named_in_docs_exist():
    lib, per_tool = _option_strings()
    unknown, seen = [], 0
    for doc in DOCS:
        text = _read(doc).replace("\\\n", " ")  # commands continued over lines
        for m in COMMAND_RE.finditer(text):
            tool, rest = m.group(1), m.group(2)
            if tool not in per_tool:
                continue
            rest = re.split(r"\||;|&&|\)\s|\bpython\b", rest)[0]  # up to the end of this command
            for flag in FLAG_RE.findall(rest):
                seen += 1
                if flag not in per_tool[tool] | lib | DETECTRON2_FLAGS:
                    lineno = text.count("\n", 0, m.start()) + 1
                    unknown.append(f"{doc} (near line {lineno}): {tool} {flag}")
    assert seen > 100, f"only {seen} options found: has the pattern stopped matching?"
    assert not unknown, "options named in the docs that the tool does not define:\n" + "\n".join(unknown)


@pytest.mark.parametrize(
    "path, expected",
    [("configs/quickstart{,_plain}.yaml", ["configs/quickstart.yaml", "configs/quickstart_plain.yaml"]),
     ("tools/demo.py", ["tools/demo.py"])],
)  # fmt: skip
def test_brace_expansion(path, expected):
    assert _expand_braces(path) == expected
