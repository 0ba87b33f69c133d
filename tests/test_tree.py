"""The tree's own rules: no import cycle between the package's modules, and one table for the
one-launch kernel's layout (alignops/policy/kernel_abi.py) that C++, Triton and the registry follow."""
from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

from alignops.policy import METHODS, kernel_abi
from tests.conftest import checkout_root

ROOT = checkout_root(module_level=True)  # reads the source tree: alignops/, csrc/, tests/


def package_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """module name -> file, for alignops/ and kernels/ (installed as alignops.kernels)."""
    out = {}
    for base, prefix in ((root / "alignops", "alignops"), (root / "kernels", "alignops.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix] + parts)] = path
    return out


def import_edges(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Every import of a package module by another, top level or inside a function (a lazy import
    still closes a cycle when both run). `from a import b` counts as importing a.b when that is a
    module. Importing a.b.c runs a/b/__init__.py first, so it also counts as importing every
    parent package of the target, except the importer's own parents (already running when it is
    imported; alignops/__init__.py, the public face that imports everything, is the parent of all)."""
    edges = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                for a in node.names:
                    targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
        edges[name] = {t for t in targets | parents if t in modules and t != name and t not in ancestors}
    return edges


def test_no_module_imports_one_that_imports_it_back():
    edges = import_edges(package_modules())
    assert edges["alignops.train.trainer"] or edges["alignops"], "the import walk found no imports at all"
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def visit(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done = set()
    for node in sorted(edges):
        if node not in done:
            visit(node, [], set(), done)
    return cycles


def test_the_import_walk_sees_a_cycle(tmp_path):
    """The check above can fail: two modules importing each other (one lazily) are a cycle, and a
    relative import resolves to the module it names."""
    (tmp_path / "alignops" / "train").mkdir(parents=True)
    (tmp_path / "alignops" / "__init__.py").write_text("")
    (tmp_path / "alignops" / "train" / "__init__.py").write_text("")
    (tmp_path / "alignops" / "train" / "a.py").write_text("from . import b\n")
    (tmp_path / "alignops" / "train" / "b.py").write_text("def f():\n    from alignops.train.a import x\n")
    edges = import_edges(package_modules(tmp_path))
    assert edges["alignops.train.a"] == {"alignops.train.b"} and edges["alignops.train.b"] == {"alignops.train.a"}


def test_the_import_walk_sees_a_cycle_through_a_parent_package(tmp_path):
    """a low module importing one submodule of a package runs that package's __init__, which
    imports the low module back: a cycle though no two modules import each other directly."""
    (tmp_path / "alignops" / "policy").mkdir(parents=True)
    (tmp_path / "alignops" / "__init__.py").write_text("")
    (tmp_path / "alignops" / "low.py").write_text("from alignops.policy.tools import helper\n")
    (tmp_path / "alignops" / "policy" / "__init__.py").write_text("from alignops.policy.fused import f\n")
    (tmp_path / "alignops" / "policy" / "tools.py").write_text("def helper():\n    pass\n")
    (tmp_path / "alignops" / "policy" / "fused.py").write_text("from alignops import low\n")
    edges = import_edges(package_modules(tmp_path))
    assert "alignops.policy" in edges["alignops.low"]
    assert find_cycles(edges) == [["alignops.low", "alignops.policy", "alignops.policy.fused", "alignops.low"]]


# --------------------------------------------------------------------------------------------
# the one-launch kernel's table


def test_cpp_header_is_generated_from_the_table():
    header = ROOT / "csrc" / "common" / "policy_abi.h"
    assert header.read_text() == kernel_abi.header_text(), (
        "csrc/common/policy_abi.h differs from alignops/policy/kernel_abi.py: run `make abi` to regenerate it")


def test_cpp_reads_knobs_and_flags_through_the_generated_enums():
    """policy_math.h reads every knob and flag by its generated name and writes no number of its own."""
    src = (ROOT / "csrc" / "common" / "policy_math.h").read_text()
    assert '#include "policy_abi.h"' in src
    for i, knob in enumerate(kernel_abi.KNOBS):
        assert f"k[kKnob{kernel_abi._camel(knob)}]" in src, knob
    for flag in kernel_abi.FLAGS:
        assert f"kFlag{kernel_abi._camel(flag)}" in src, flag
    assert "enum PolicyKnob" not in src and "enum PolicyMethodCode" not in src


def test_triton_kernel_takes_every_knob_and_flag_by_name():
    pytest.importorskip("triton")
    from alignops.kernels import policy_loss as kpl  # noqa: PLC0415
    params = list(inspect.signature(kpl._policy_loss_fused_kernel.fn).parameters)
    for knob in kernel_abi.KNOBS:
        assert knob in params, knob
    for flag in kernel_abi.FLAGS:
        assert flag.upper() in params, flag
    for code in kernel_abi.METHOD_CODES:
        assert getattr(kpl, code.upper()).value == kernel_abi.METHOD_CODES[code], code


def test_pack_lays_knobs_out_in_table_order():
    knobs, flags = kernel_abi.pack({"clip_lo": 0.8, "scale": 2.0, "dual_clip": 3.0}, has_old=True, has_ref=False,
                                   has_is_weight=True)
    assert len(knobs) == len(kernel_abi.KNOBS)
    assert knobs[kernel_abi.KNOBS.index("clip_lo")] == 0.8 and knobs[kernel_abi.KNOBS.index("scale")] == 2.0
    assert knobs[kernel_abi.KNOBS.index("dual_clip")] == 3.0 and knobs[kernel_abi.KNOBS.index("log_clamp")] == 0.0
    assert kernel_abi.unpack_flags(flags) == {"has_old": True, "has_ref": False, "has_is_weight": True,
                                              "dual_clip": True, "log_clamp": False, "early_shift": False}
    with pytest.raises(ValueError, match="unknown policy kernel knobs"):
        kernel_abi.pack({"clip_low": 0.2}, has_old=False, has_ref=False, has_is_weight=False)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_entry_is_complete(name):
    """Every entry's one-launch code exists in the table, its knobs are table knobs, and each of its
    examples is a valid option set."""
    from alignops.policy.registry import SharedKnobs, one_launch_knobs, resolve_options  # noqa: PLC0415
    m = METHODS[name]
    assert m.examples, name
    shared_keys = {"clip_low", "clip_high", "clip_ratio_c", "agg"}
    for example in m.examples:
        opts = resolve_options(m, {k: v for k, v in example.items() if k not in shared_keys})
        if m.one_launch is not None and m.one_launch.applies(opts):
            assert m.one_launch.code in kernel_abi.METHOD_CODES
            knobs = one_launch_knobs(m, opts, SharedKnobs(0.2, 0.28, None, 20.0, 0.0, "k3", 0.0, "token-mean", None))
            assert set(knobs) <= set(kernel_abi.KNOBS)
