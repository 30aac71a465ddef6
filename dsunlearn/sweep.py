"""Hyperparameter sweeps: every (method, grid point) is one ``unlearn`` run; robustness = the fraction in the band.

    python -m dsunlearn sweep --config run.json --zero ds_configs/zero3.json \\
        --grid train.lr=1e-5,2e-5,5e-5 --grid train.num_steps=20,40 --methods ga,ga_gd,ga_gd:general
    deepspeed --num_gpus 8 --module dsunlearn sweep ...          (every rank iterates the same points)

Each point is the run config plus the method and the point's values, run through ``loop.unlearn`` with the run
config's evaluation and stop rule, in its own run directory ``OUT/<method>/<point>/``. Points run one after another in
ONE process: the process group is created once, and imports and setup (~15 s per launch on CPU) are paid once;
``engine.release_engines`` frees each point's engines before the next one.

Resumable: a point whose run directory holds ``summary.json`` and ``metrics.json`` is complete and never rerun (if
its run config or resolved ZeRO config differs from what the point would run now, that is an error, never a silent
mix); any other point is (re)run from scratch. Rerunning the same command after a crash finishes the sweep.

In band (one point): the verdict of its exported weights is "forgotten", by the same criteria as every run's verdict
(``eval/verdict.py``: forget loss at the target, no attack separating forget from unseen text beyond the band, retain
and approximate loss within ``eval.utility_tolerance``). Robustness of a method = points in the band / points of the
method. ``forget_tol`` and ``retain_tol`` only mark the heatmaps (overshot, retain degraded).

Method specs: ``name`` or ``name:retain|general`` (which set feeds the retain stream, ``data.retain_source``);
without a suffix the run config's ``data.retain_source`` applies. The run config's ``method.weights``/``params``
belong to the method it names; every other method of the sweep runs with its paper defaults.

Outputs: ``OUT/sweep.json`` (every point's figures), ``OUT/sweep.md`` (tables), ``OUT/plots/heatmap_<method>.png``.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import engine as E
from . import loop
from .config import ConfigError, MethodConfig, RunConfig, load_run_config, parse_override, to_dict
from .data import write_json_atomic
from .prepare import prepare
from .zero import resolve_configs

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RESERVED_GRID_KEYS = {"method.name": "--methods", "data.retain_source": "--methods NAME:retain|general",
                      "output.run_dir": "--out"}
X_KEY, Y_KEY = "train.lr", "train.num_steps"


@dataclass(frozen=True)
class GridAxis:
    key: str
    values: tuple  # parsed (JSON where it parses), in the order given


@dataclass(frozen=True)
class Point:
    label: str            # method label: "ga_gd" or "ga_gd:general"
    method: str
    retain_source: str
    params: dict          # grid key -> value
    name: str             # directory name of the point
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.run_dir)


def parse_grid(specs: list[str]) -> list[GridAxis]:
    """``["train.lr=1e-5,2e-5", "train.num_steps=20,40"]`` -> axes. Values are checked when the configs are built."""
    axes, seen = [], set()
    for text in specs:
        if "=" not in text:
            raise ConfigError(f"--grid {text!r}: expected section.key=v1,v2,...")
        key, raw = text.split("=", 1)
        key = key.strip()
        if key in RESERVED_GRID_KEYS:
            raise ConfigError(f"--grid {key}: not a grid key; use {RESERVED_GRID_KEYS[key]}")
        if key in seen:
            raise ConfigError(f"--grid {key}: given twice")
        raws = [v.strip() for v in raw.split(",")]
        if not key or any(not v for v in raws):
            raise ConfigError(f"--grid {text!r}: expected section.key=v1,v2,... with no empty value")
        values = tuple(parse_override(f"{key}={v}")[1] for v in raws)
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"--grid {key}: repeated value")
        seen.add(key)
        axes.append(GridAxis(key, values))
    return axes


def parse_methods(text: str) -> list[tuple[str, Optional[str]]]:
    """``"ga,ga_gd:general"`` -> [("ga", None), ("ga_gd", "general")]."""
    out = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            raise ConfigError(f"--methods {text!r}: empty method name")
        name, _, source = spec.partition(":")
        if source and source not in ("retain", "general"):
            raise ConfigError(f"--methods {spec}: the suffix is the retain source, 'retain' or 'general'")
        out.append((name, source or None))
    return out


def format_value(value) -> str:
    """Shortest exact text of a grid value (``1e-05``, ``0.0003``, ``20``, ``general``)."""
    return value if isinstance(value, str) else json.dumps(value)


def point_name(params: dict) -> str:
    """``{"train.lr": 1e-05, "train.num_steps": 20}`` -> ``lr=1e-05_num_steps=20`` (full keys where short ones
    clash)."""
    short = [k.rsplit(".", 1)[-1] for k in params]
    names = [s if short.count(s) == 1 else k for s, k in zip(short, params)]
    text = "_".join(f"{n}={format_value(v)}" for n, v in zip(names, params.values()))
    return re.sub(r"[^A-Za-z0-9=.+\-_]", "-", text) or "default"


def plan(config_path: Optional[str], overrides: list[str], grid: list[GridAxis], methods: list[tuple],
         out_dir: str) -> list[Point]:
    """Every point's run config, built and validated before anything runs."""
    from .methods import build_method
    base = load_run_config(config_path, overrides)
    points, labels = [], set()
    for name, source in methods:
        method_overrides = [f"method.name={name}"]
        if name != base.method.name:
            if base.method.weights or base.method.params:
                log.warning("sweep: method.weights/params of the run config belong to %r; %r runs with its defaults",
                            base.method.name, name)
            method_overrides += ["method.weights={}", "method.params={}"]
        streams = build_method(MethodConfig(name=name)).streams
        if source and "retain" not in streams:
            raise ConfigError(f"--methods {name}:{source}: {name} has no retain stream, the suffix would change "
                              f"nothing")
        retain_source = source or base.data.retain_source
        label = f"{name}:general" if "retain" in streams and retain_source == "general" else name
        if label in labels:
            raise ConfigError(f"--methods: {label} given twice")
        labels.add(label)
        names = set()
        for values in itertools.product(*(axis.values for axis in grid)):
            params = {axis.key: v for axis, v in zip(grid, values)}
            pname = point_name(params)
            if pname in names:
                raise ConfigError(f"--grid: two points would share the directory name {pname!r}")
            names.add(pname)
            run_dir = Path(out_dir) / label.replace(":", "-") / pname
            point_overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params.items()]
            cfg = load_run_config(config_path, list(overrides) + method_overrides +
                                  [f"data.retain_source={retain_source}"] + point_overrides +
                                  [f"output.run_dir={run_dir}"])
            points.append(Point(label, name, retain_source, params, pname, cfg))
    return points


def check_points(points: list[Point], zero_path: str) -> None:
    """What a launch of each point would refuse (``prepare``, without tokenising), checked for all of them before the
    first one runs, plus what a sweep needs to judge a point."""
    world = E.world_size()
    for p in points:
        where = f"sweep point {p.label}/{p.name}"
        cfg = p.cfg
        try:
            prepare(cfg, zero_path, world, load_data=False)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        need = [s for s in ("forget", "retain") if not getattr(cfg.data, s) or s not in cfg.eval.splits]
        if not cfg.eval.retrained_model and (not cfg.data.approximate or "approximate" not in cfg.eval.splits):
            need.append("approximate (or eval.retrained_model)")
        if need:
            raise ConfigError(f"{where}: a sweep judges every point on the forget loss vs a target and the retain "
                              f"loss vs the original; set data.* and eval.splits for: {', '.join(need)}")


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def point_state(p: Point, ds_config: dict) -> str:
    """"done" (complete, and run with this very run config and resolved ZeRO config) or "run" (absent or incomplete).

    A complete point run with another config (an edited run config, another ZeRO JSON, another world size, hence
    another global batch) raises: mixing it into this sweep would compare unlike runs.
    """
    summary, metrics = _read_json(p.run_dir / "summary.json"), _read_json(p.run_dir / "metrics.json")
    if not (summary and "steps" in summary and metrics and "after" in metrics):
        return "run"
    want = to_dict(p.cfg)
    stored = _read_json(p.run_dir / "config.json") or {}
    diff = sorted(f"{s}.{k}" for s in want for k in want[s] if (stored.get(s) or {}).get(k) != want[s][k])
    stored_ds = _read_json(p.run_dir / "ds_config.json") or {}
    ds_config = json.loads(json.dumps(ds_config))  # as written: tuples are lists
    diff += sorted(f"ZeRO config {k}" for k in set(ds_config) | set(stored_ds) if stored_ds.get(k) != ds_config.get(k))
    if diff:
        raise ConfigError(f"sweep point {p.run_dir} is complete but was run with another config (differs in "
                          f"{', '.join(diff)}); use another --out, or delete that directory to rerun it")
    return "done"


def run_sweep(config_path: Optional[str], zero_path: str, grid_specs: list[str], methods_spec: str, out_dir: str,
              overrides: list[str] = (), forget_tol: float = 0.1, retain_tol: float = 0.1,
              command: str = "") -> Optional[dict]:
    """Run every missing point, then write sweep.json / sweep.md / heatmaps. Returns the summary on rank 0."""
    if forget_tol <= 0 or retain_tol <= 0:
        raise ConfigError("--forget-tol and --retain-tol: expected > 0 (nats)")
    grid = parse_grid(list(grid_specs))
    points = plan(config_path, list(overrides), grid, parse_methods(methods_spec), out_dir)
    check_points(points, zero_path)
    E.init_distributed()
    # Rank 0 judges what is complete (its view of the filesystem); every rank then runs the same points.
    states, error = None, None
    if E.is_main():
        try:
            states = [point_state(p, resolve_configs(p.cfg, zero_path, E.world_size())) for p in points]
        except ConfigError as e:
            error = str(e)
    states, error = E.broadcast_object((states, error))
    if error:
        raise ConfigError(error)
    meta = {"command": command, "config": config_path, "zero": zero_path, "out": str(out_dir),
            "grid": {a.key: list(a.values) for a in grid}, "forget_tol": forget_tol, "retain_tol": retain_tol}
    todo = [p for p, s in zip(points, states) if s == "run"]
    if E.is_main():
        log.info("sweep: %d points, %d complete, %d to run", len(points), len(points) - len(todo), len(todo))
    for i, p in enumerate(todo):
        if E.is_main():
            log.info("sweep point %d/%d: %s %s", i + 1, len(todo), p.label, p.name)
        # The point's exit code (3 = diverged, stopped by the guard) is part of its result, not a sweep failure.
        loop.unlearn(p.cfg, zero_path, overwrite=True)
        alive = E.release_engines()
        if alive and E.is_main():
            log.warning("sweep: %d DeepSpeed engine(s) of finished points are still alive (memory grows per point)",
                        alive)
        if E.is_main():
            write_json_atomic(Path(out_dir) / "sweep.json", summarize(points, meta, forget_tol, retain_tol))
    summary = None
    if E.is_main():
        summary = summarize(points, meta, forget_tol, retain_tol)
        write_outputs(summary, Path(out_dir))
    E.barrier()
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Figures

def _finite(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def point_figures(metrics: dict, forget_tol: float, retain_tol: float) -> dict:
    """The figures of one finished point from its metrics.json.

    Judged on the weights the run delivers ("after": with the stop rule on, the evaluated step that best met the
    verdict's criteria, never the original model) by the run's own verdict. ``final_*`` are the last
    evaluation's (the final weights): a run that jumped over the band between two evaluations is ``overshot`` even
    when what it exports sits below the target.
    """
    before, after = metrics["before"]["splits"], metrics["after"]["splits"]
    final = (metrics.get("history") or [metrics["after"]])[-1]["splits"]
    retrained = (metrics.get("retrained") or {}).get("splits", {})
    if "forget" in retrained:
        target, target_source = retrained["forget"]["loss"], "retrained model: forget loss"
    else:
        target, target_source = before["approximate"]["loss"], "original model: approximate loss"
    retain0 = before["retain"]["loss"]
    general0 = _finite(before.get("general", {}).get("loss"))

    def delta(value, base):
        return value - base if value is not None and base is not None else None

    loss = {s: _finite(after.get(s, {}).get("loss")) for s in ("forget", "retain", "approximate", "general")}
    final_forget, final_retain = (_finite(final.get(s, {}).get("loss")) for s in ("forget", "retain"))
    gap, degradation = delta(loss["forget"], target), delta(loss["retain"], retain0)
    final_gap = delta(final_forget, target)
    return {
        "forget_loss": loss["forget"], "retain_loss": loss["retain"], "approximate_loss": loss["approximate"],
        "general_loss": loss["general"],
        "target": target, "target_source": target_source,
        "forget_gap": gap,
        "retain_loss_original": retain0,
        "retain_degradation": degradation,
        "general_degradation": delta(loss["general"], general0),
        "retain_degraded": degradation is None or degradation > retain_tol,
        # The run's own verdict criteria, judged without the twin (as the run chose its step): a twin only reports.
        "in_band": bool((metrics.get("selection") or metrics.get("judgement") or {}).get("ok")),
        "final_forget_gap": final_gap, "final_retain_degradation": delta(final_retain, retain0),
        # A non-finite final forget loss (divergence) counts as overshooting.
        "overshot": final_gap is None or final_gap > forget_tol,
        "steps": metrics.get("steps"), "exported_step": metrics.get("exported_step"),
        "stop_reason": metrics.get("stop_reason"), "verdict": metrics.get("verdict"),
    }


def summarize(points: list[Point], meta: dict, forget_tol: float, retain_tol: float) -> dict:
    """sweep.json: every point (figures where complete) and the robustness of every method."""
    rows, robustness = [], {}
    for p in points:
        row = {"method": p.label, "name": p.method, "retain_source": p.retain_source, "params": p.params,
               "run_dir": str(p.run_dir), "complete": False}
        summary, metrics = _read_json(p.run_dir / "summary.json"), _read_json(p.run_dir / "metrics.json")
        if summary and metrics and "after" in metrics:
            row.update(complete=True, exit_code=summary.get("exit_code"),
                       **point_figures(metrics, forget_tol, retain_tol))
        rows.append(row)
        r = robustness.setdefault(p.label, {"points": 0, "complete": 0, "in_band": 0})
        r["points"] += 1
        r["complete"] += row["complete"]
        r["in_band"] += bool(row.get("in_band"))
    for r in robustness.values():
        r["robustness"] = r["in_band"] / r["points"] if r["complete"] == r["points"] else None
    targets = sorted({r["target_source"] for r in rows if r.get("target_source")})
    return {"schema_version": SCHEMA_VERSION, **meta,
            "target": targets[0] if len(targets) == 1 else targets,
            "band": "the verdict of the exported weights is 'forgotten' (eval/verdict.py, docs/evaluation.md)",
            "robustness": robustness, "points": rows}


def _axes(summary: dict) -> tuple[Optional[str], Optional[str], list[str]]:
    """Heatmap axes: x = train.lr, y = train.num_steps where they are grid keys, else the first grid keys in order;
    every further key makes one heatmap per value combination."""
    keys = list(summary["grid"])
    x = X_KEY if X_KEY in keys else (keys[0] if keys else None)
    rest = [k for k in keys if k != x]
    y = Y_KEY if Y_KEY in rest else (rest[0] if rest else None)
    return x, y, [k for k in rest if k != y]


def _sorted_values(values: list) -> list:
    try:
        return sorted(values)
    except TypeError:
        return list(values)


def write_outputs(summary: dict, out_dir: Path) -> None:
    from .eval.plots import plot_sweep_heatmap
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y, facet_keys = _axes(summary)
    xs = _sorted_values(summary["grid"][x]) if x else [None]
    ys = _sorted_values(summary["grid"][y]) if y else [None]
    gaps = [abs(r["forget_gap"]) for r in summary["points"] if r.get("forget_gap") is not None]
    limit = max(gaps, default=1.0)
    images = {}
    for label, rob in summary["robustness"].items():
        rows = [r for r in summary["points"] if r["method"] == label]
        for facet in itertools.product(*(summary["grid"][k] for k in facet_keys)):
            fixed = dict(zip(facet_keys, facet))
            cell = {}
            for r in rows:
                if all(r["params"][k] == v for k, v in fixed.items()):
                    cell[(r["params"].get(y), r["params"].get(x))] = r
            grid_of = lambda key: [[(cell.get((yv, xv)) or {}).get(key) for xv in xs] for yv in ys]  # noqa: E731
            gap = [[math.nan if v is None else v for v in row] for row in grid_of("forget_gap")]
            done = grid_of("complete")
            degraded = [[bool(c and d) for c, d in zip(*rows_)] for rows_ in zip(done, grid_of("retain_degraded"))]
            overshot = [[bool(c and o) for c, o in zip(*rows_)] for rows_ in zip(done, grid_of("overshot"))]
            in_band = [[bool(v) for v in row] for row in grid_of("in_band")]
            suffix = "".join(f"__{point_name({k: v})}" for k, v in fixed.items())
            fname = f"heatmap_{label.replace(':', '-')}{suffix}.png"
            frac = "–" if rob["robustness"] is None else f"{rob['robustness']:.2f}"
            title = (f"{label}{' ' + point_name(fixed) if fixed else ''}: robustness {frac} "
                     f"({rob['in_band']}/{rob['points']} in band)\ntarget: {summary['target']}")
            images.setdefault(label, []).append(plot_sweep_heatmap(
                [format_value(v) for v in xs], [format_value(v) for v in ys], gap, degraded, in_band,
                out_dir / "plots" / fname, overshot=overshot, title=title, x_label=x or "", y_label=y or "",
                limit=limit, band=summary["forget_tol"]))
    write_json_atomic(out_dir / "sweep.json", summary)
    (out_dir / "sweep.md").write_text(render_markdown(summary, x, y, xs, ys, images, out_dir), encoding="utf-8")


def _f(x, digits=3, sign=False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def render_markdown(summary: dict, x, y, xs, ys, images: dict, out_dir: Path) -> str:
    lines = ["# dsunlearn sweep", ""]
    if summary.get("command"):
        lines += [f"    {summary['command']}", ""]
    lines += [f"- target: {summary['target']}",
              f"- band: {summary['band']}",
              f"- grid: " + "; ".join(f"`{k}` = {', '.join(map(format_value, v))}" for k, v in summary["grid"].items()),
              "", "## Robustness (fraction of grid points in the band)", "",
              "| method | in band | points | robustness |", "|---|---|---|---|"]
    for label, r in summary["robustness"].items():
        frac = "incomplete" if r["robustness"] is None else f"{r['robustness']:.2f}"
        lines.append(f"| {label} | {r['in_band']} | {r['points']} | {frac} |")
    lines += ["", "## Forget-loss gap to the target per point (nats)", "",
              "Cell: gap (forget loss − target) of the delivered weights; **bold** = in the band; R = retain loss "
              "degraded beyond the tolerance; O = overshot: the final weights' forget loss is above the band (with the "
              "stop rule on, the delivered weights are the evaluation closest to the target; step 0 = the original).",
              ""]
    for label in summary["robustness"]:
        rows = [r for r in summary["points"] if r["method"] == label]
        lines += [f"### {label}", ""]
        for img in images.get(label, []):
            lines += [f"![{label}]({Path(img).relative_to(out_dir).as_posix()})", ""]
        if x and y and len(rows) == len(xs) * len(ys):
            lines += [f"| {y} \\ {x} | " + " | ".join(map(format_value, xs)) + " |", "|---" * (len(xs) + 1) + "|"]
            for yv in ys:
                cells = []
                for xv in xs:
                    r = next(r for r in rows if r["params"].get(x) == xv and r["params"].get(y) == yv)
                    text = _f(r.get("forget_gap"), 2, sign=True) if r["complete"] else "not run"
                    text = f"**{text}**" if r.get("in_band") else text
                    flags = "R" * bool(r["complete"] and r["retain_degraded"]) + "O" * bool(r.get("overshot"))
                    cells.append(text + (f" {flags}" if flags else ""))
                lines.append(f"| {format_value(yv)} | " + " | ".join(cells) + " |")
            lines.append("")
    keys = list(summary["grid"])
    lines += ["## All points", "",
              "| method | " + " | ".join(keys) + " | steps run | forget | retain | approx. | gap | retain Δ | "
              "general Δ | in band | final gap | final retain Δ | stop | verdict |",
              "|---" * (len(keys) + 13) + "|"]
    for r in summary["points"]:
        params = " | ".join(format_value(r["params"][k]) for k in keys)
        if not r["complete"]:
            lines.append(f"| {r['method']} | {params} | not run |" + " |" * 12)
            continue
        lines.append(f"| {r['method']} | {params} | {r['steps']} (exported {r['exported_step']}) | "
                     f"{_f(r['forget_loss'])} | {_f(r['retain_loss'])} | {_f(r['approximate_loss'])} | "
                     f"{_f(r['forget_gap'], sign=True)} | {_f(r['retain_degradation'], sign=True)} | "
                     f"{_f(r['general_degradation'], sign=True)} | {'yes' if r['in_band'] else 'no'} | "
                     f"{_f(r['final_forget_gap'], sign=True)} | {_f(r['final_retain_degradation'], sign=True)} | "
                     f"{r['stop_reason'] or 'planned steps'} | {r['verdict']} |")
    return "\n".join(lines) + "\n"
