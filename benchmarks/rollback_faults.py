"""Rollback on identical inputs: detection rate of graded faults in real blobs vs the false-rollback rate.

Given an export, a stream (.npy of uint8 frames, labels optional) and the blobs of an adaptation run (the cloud's
``--state`` folder ``blobs/``), each trial takes a consecutive pair of real blobs (v_k serving, v_k+1 arriving) and
a window of W consecutive frames from where v_k served in the stream (blob k of K is placed at k/K of the stream),
injects one fault into v_k+1 and asks the edge's rule (``runtime.updates.rollback.judge``: mutual information
between input and prediction, previous vs new parameters on the same frames) whether to roll back:

* ``none``: v_k+1 unmodified (a rollback here is a false rollback)
* ``var_x2`` / ``var_x10`` / ``var_x100``: one BatchNorm layer's running variance times 2, 10, 100
* ``gamma_flip``: one normalisation layer's gamma with its sign flipped
* ``other_seed``: the blob of the same version from another seed's adaptation run (``--other-blobs``)

The layer is drawn at random per trial. Besides the rates of the runtime's rule at ``--margin`` (a drop beyond it
that collapses or flattens the predictions by ``--collapse-ratio`` / ``--flatten-ratio``; both 0: any drop beyond
the margin) the script reports the rates of any drop beyond a range of margins, and the score drops themselves,
so the default margin can be chosen from the data. Torch-free (ONNX
Runtime on CPU). Writes JSON (``--json``) and prints a table.

Example:
    python benchmarks/rollback_faults.py out/demo/edge-model --stream run/stream.npy \\
        --blobs run/cloud-state/blobs --other-blobs run-seed1/cloud-state/blobs --trials 10 --json faults.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.blob import RefitBlob, blob_from_path
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.runtime.backends.onnxrt import session_from_onnx
from cema_deploy.runtime.frames.preprocess import images_at_model_size, normalize
from cema_deploy.runtime.updates.rollback import RollbackConfig, information, judge

FAULTS = ("none", "var_x2", "var_x10", "var_x100", "gamma_flip", "other_seed")
MARGINS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
_VERSION = re.compile(r"v(\d+)\.safetensors$")


def blobs_in(folder: Path) -> dict[int, Path]:
    """Blob files of a cloud state's ``blobs/`` folder by version."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _VERSION.search(p.name))}
    if len(found) < 2:
        raise SystemExit(f"{folder} holds {len(found)} blobs; an adaptation run with >= 2 published blobs is needed.")
    return dict(sorted(found.items()))


def inject(
    blob: RefitBlob, fault: str, rng: np.random.Generator, other: RefitBlob | None
) -> tuple[dict[str, Any], str]:
    """``blob``'s tensors with ``fault`` injected; returns (tensors, what was changed)."""
    t = dict(blob.tensors)
    if fault == "none":
        return t, ""
    if fault == "other_seed":
        assert other is not None
        return dict(other.tensors), f"v{other.version} of the other run"
    if fault.startswith("var_x"):
        layers = sorted(k for k in t if k.endswith(".running_var"))
        if not layers:
            raise SystemExit("The model has no BatchNorm running variances; var_x* faults do not apply.")
        k = layers[rng.integers(len(layers))]
        t[k] = (t[k] * float(fault[5:])).astype(t[k].dtype)
        return t, k
    if fault == "gamma_flip":
        layers = sorted(k for k in t if k.endswith(".weight"))
        k = layers[rng.integers(len(layers))]
        t[k] = -t[k]
        return t, k
    raise ValueError(fault)


class _Logits:
    """Logits of one parameter set on stream windows, with the session cached per blob."""

    def __init__(self, model: Path, frames: np.ndarray, pre: Any, threads: int | None) -> None:
        self.model, self.frames, self.pre, self.threads = model, frames, pre, threads
        self._cache: dict[int, Any] = {}

    def session(self, tensors: dict[str, Any], key: int | None = None) -> Any:
        if key is not None and key in self._cache:
            return self._cache[key]
        s = session_from_onnx(self.model, tensors=tensors, intra_op_threads=self.threads)
        if key is not None:
            self._cache = {key: s, **{k: v for k, v in list(self._cache.items())[-3:]}}
        return s

    def run(self, session: Any, start: int, window: int) -> np.ndarray:
        x = np.asarray(self.frames[start : start + window])  # normalised per window: memory bounded by it
        chunks = [normalize(images_at_model_size(x[i : i + 64], self.pre), self.pre) for i in range(0, len(x), 64)]
        return np.concatenate([session.run(chunk) for chunk in chunks])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("export", type=Path, help="export folder (model.onnx, manifest.json)")
    ap.add_argument("--stream", type=Path, required=True, help=".npy of uint8 frames [N, H, W, 3] the run served")
    ap.add_argument("--labels", type=Path, help=".npy of N labels (only reported: accuracy of each blob's window)")
    ap.add_argument("--blobs", type=Path, required=True, help="the run's blobs/ folder (cloud --state)")
    ap.add_argument("--other-blobs", type=Path, help="blobs/ of an adaptation run with another seed, same export")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--window", type=int, default=RollbackConfig().window, help="frames in the ring")
    ap.add_argument("--margin", type=float, default=RollbackConfig().margin_ratio, help="allowed drop / ln C")
    ap.add_argument("--collapse-ratio", type=float, default=RollbackConfig().collapse_ratio,
                    help="fall of the entropy of the mean prediction that makes a drop count, / ln C")  # fmt: skip
    ap.add_argument("--flatten-ratio", type=float, default=RollbackConfig().flatten_ratio,
                    help="rise of the mean entropy that makes a drop count, / ln C")  # fmt: skip
    ap.add_argument(
        "--harm-points",
        type=float,
        default=5.0,
        help="with --labels: a fault is harmful when it costs the window this many accuracy points",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    manifest = manifest_from_dir(args.export)
    c = manifest.num_classes
    frames = np.load(args.stream, mmap_mode="r")
    labels = np.load(args.labels) if args.labels is not None else None
    w = min(args.window, len(frames))
    blobs = blobs_in(args.blobs)
    versions = list(blobs)
    others = blobs_in(args.other_blobs) if args.other_blobs is not None else {}
    faults = [f for f in FAULTS if f != "other_seed" or others]
    rng = np.random.default_rng(args.seed)
    logits = _Logits(args.export / manifest.model_file, frames, manifest.preprocess, args.threads)
    rows: dict[str, list[dict[str, Any]]] = {f: [] for f in faults}
    for trial in range(args.trials):
        k = int(rng.integers(len(versions) - 1))
        old_v, new_v = versions[k], versions[k + 1]
        old, new = blob_from_path(blobs[old_v]), blob_from_path(blobs[new_v])
        end = round((k + 1) / len(versions) * len(frames))  # where v_k served in the stream
        start = int(np.clip(end - w + rng.integers(-w // 2, w // 2 + 1), 0, len(frames) - w))
        old_logits = logits.run(logits.session(dict(old.tensors), old_v), start, w)
        acc_unmodified = None
        for fault in faults:
            other = None
            if fault == "other_seed":
                ov = min(others, key=lambda v: abs(v - new_v))
                other = blob_from_path(others[ov])
            tensors, what = inject(new, fault, rng, other)
            sess = logits.session(tensors, new_v if fault == "none" else None)
            new_logits = logits.run(sess, start, w)
            j = judge(old_logits, new_logits, num_classes=c, margin_ratio=args.margin,
                      collapse_ratio=args.collapse_ratio, flatten_ratio=args.flatten_ratio, version=new_v,
                      previous_version=old_v)  # fmt: skip
            row = {"trial": trial, "old": old_v, "new": new_v, "start": start, "changed": what,
                   "score_old": j.score_previous, "score_new": j.score_new,
                   "drop_ratio": (j.score_previous - j.score_new) / np.log(c), "rollback": j.rollback,
                   "reason": j.reason, "collapse": j.collapse, "flatten": j.flatten}  # fmt: skip
            if labels is not None:
                y = labels[start : start + w]
                row["acc_old"] = float((old_logits.argmax(1) == y).mean())
                row["acc_new"] = float((new_logits.argmax(1) == y).mean())
                if fault == "none":
                    acc_unmodified = row["acc_new"]
                assert acc_unmodified is not None  # "none" is judged first
                row["harmful"] = 100 * (acc_unmodified - row["acc_new"]) >= args.harm_points
            rows[fault].append(row)
        print(f"trial {trial + 1}/{args.trials}: v{old_v} -> v{new_v}, frames {start}..{start + w}", file=sys.stderr)

    def decided(rs: list[dict[str, Any]]) -> float:  # the runtime's rule as configured
        return float(np.mean([r["rollback"] for r in rs])) if rs else float("nan")

    def rate(rs: list[dict[str, Any]], margin: float) -> float:
        hits = [r["reason"] == "nonfinite" or not r["drop_ratio"] <= margin for r in rs]  # NaN drops count as hits
        return float(np.mean(hits)) if rs else float("nan")

    result = {
        "export": str(args.export),
        "blobs": str(args.blobs),
        "blob_versions": [versions[0], versions[-1], len(versions)],
        "other_blobs": str(args.other_blobs) if args.other_blobs else None,
        "trials": args.trials,
        "window": w,
        "margin_ratio": args.margin,
        "collapse_ratio": args.collapse_ratio,
        "flatten_ratio": args.flatten_ratio,
        "num_classes": c,
        "score_mean_old": float(np.mean([r["score_old"] for r in rows["none"]])),
        "ln_c": float(np.log(c)),
        "false_rollback_rate": decided(rows["none"]),
        "detection": {f: decided(rows[f]) for f in faults if f != "none"},
        "by_margin": {str(m): {f: rate(rows[f], m) for f in faults} for m in MARGINS},
        "drop_ratio": {f: [r["drop_ratio"] for r in rows[f]] for f in faults},
        "harm_points": args.harm_points if labels is not None else None,
        "harmful_detection": (
            {f: decided([r for r in rows[f] if r["harmful"]]) for f in faults if f != "none"}
            if labels is not None
            else None
        ),
        "harmful_trials": {f: sum(r["harmful"] for r in rows[f]) for f in faults} if labels is not None else None,
        "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
        "information_of_a_uniform_window": information(np.zeros((w, c))),
    }
    print(f"\nwindow {w} frames, margin {args.margin:g} ln C ({args.margin * np.log(c):.3f} nats), collapse "
          f"{args.collapse_ratio:g} / flatten {args.flatten_ratio:g} ln C, {args.trials} trials, "
          f"blobs v{versions[0]}..v{versions[-1]}")  # fmt: skip
    print(f"the runtime's rule: false rollbacks {result['false_rollback_rate']:.2f}, detection "
          + ", ".join(f"{f} {r:.2f}" for f, r in result["detection"].items()))  # fmt: skip
    print(f"{'fault':<12}" + "".join(f"{'m=' + str(m):>9}" for m in MARGINS) + "   max drop/lnC  min drop/lnC")
    for f in faults:
        d = [x for x in result["drop_ratio"][f] if np.isfinite(x)]
        print(f"{f:<12}" + "".join(f"{result['by_margin'][str(m)][f]:>9.2f}" for m in MARGINS)
              + f"   {max(d, default=float('nan')):>11.3f}  {min(d, default=float('nan')):>11.3f}")  # fmt: skip
    print("(rows: rate of drops beyond each margin; 'none' is the false-rollback rate)")
    if labels is not None:
        print(f"faults costing >= {args.harm_points:g} accuracy points on the window, caught by the runtime's rule: "
              + ", ".join(f"{f} {result['harmful_detection'][f]:.2f} of {result['harmful_trials'][f]}"
                          for f in faults if f != "none"))  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


if __name__ == "__main__":
    main()
