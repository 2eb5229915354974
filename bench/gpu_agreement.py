"""Do a GPU's fp16 embeddings give the labels that CPU fp32 ones do?

Issue #25, item 3: label agreement of GPU fp16 against CPU fp32 on dev
conversations (target: at least 99.5 % of hops the same). The GPU machine
gets no `../shared` and at most 64 MiB with the repository, so the work is
split in three steps, each `python -m bench.gpu_agreement <step>`:

1. `prepare` (here): one held-back dev conversation per condition
   (bench/devset.py) replayed through the server's `SessionEngine`; every
   window it asks the model for (enrollment and hop windows, exactly as the
   server sends them) is saved, with the CPU fp32 embeddings of the real
   model and the labels they give. The ECAPA weights go along in fp16
   (42 MB, the 83 MB fp32 file does not fit beside the windows). Writes
   `--dir` (default `.agree/`, git-ignored: bring it with `carry`), with
   SpeechBrain's wheels from `../shared/device/wheels` when they are there.
2. `embed` (on the GPU machine): the same windows through the server's own
   `Embedder` on `cuda` (fp16 autocast, the Fbank in float32, as a GPU
   replica runs), the real weights loaded into the ECAPA of
   `RandomEcapa`'s shape; writes `gpu_embeddings.npz` and prints the cosine
   to the CPU fp32 embeddings. `--device cpu` rehearses it here.
3. `report` (here): the conversations replayed again with the GPU's
   embeddings; prints the share of hops labelled the same and both
   four-class accuracies, and writes bench/results/gpu_agreement.json
   (`--result`), with what `embed` said of its run.

    python -m bench.gpu_agreement prepare
    # on the GPU machine (carry [".agree"]), with SpeechBrain installed:
    #   pip install --no-index --no-deps --target /tmp/site .agree/*.whl
    #   PYTHONPATH=/tmp/site:$PWD python3 -m bench.gpu_agreement embed --out $OUT
    python -m bench.gpu_agreement report --gpu $OUT/gpu_embeddings.npz
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT.parent / "shared" / "device" / "wheels"
# What `embed` needs beyond the GPU machine's own packages: SpeechBrain and
# what it imports (../shared/device/README.md); not Ray's 40 MB wheel.
WHEEL_PREFIXES = (
    "speechbrain-",
    "hyperpyyaml-",
    "ruamel_yaml-",
    "ruamel_yaml_clib-",
    "soundfile-",
    "cffi-",
    "pycparser-",
    "python_dotenv-",
)


def _conversations():
    """One held-back conversation per condition, ready to replay."""
    from bench import devset
    from bench import tune_decision as td

    chosen: dict[str, object] = {}
    for d in devset.dev_set(4):
        if d.fold == devset.HELD and d.condition not in chosen:
            chosen[d.condition] = d
    return [(d, td.prepare(d.key, d.conv)) for d in chosen.values()]


def _replay(prep, cache) -> list[dict]:
    """Label messages of one conversation as bench/cv_decision.py replays it,
    each window's embedding from `cache.embed`."""
    from bench import cv_decision as cvd
    from diglett.settings import Settings

    return cvd.replay(prep, Settings.from_env(dotenv=False), cache)


class _Answers:
    """`EmbedCache.embed` answered from saved {digest: embedding (192,)}."""

    def __init__(self, saved) -> None:
        self.saved = saved

    def embed(self, xs: list[np.ndarray]) -> np.ndarray:
        from bench.embed_cache import digest

        return np.stack([self.saved[digest(x)] for x in xs]).reshape(-1, 192)


def _to_s16(x: np.ndarray) -> np.ndarray:
    """A window (n,) float32 of 16-bit samples as int16, exactly."""
    y = np.round(np.asarray(x, np.float32) * 32768.0).astype(np.int16)
    if not np.array_equal(_from_s16(y), x):
        raise ValueError("a window is not 16-bit audio")
    return y


def _from_s16(y: np.ndarray) -> np.ndarray:
    return y.astype(np.float32) / np.float32(32768.0)


def prepare(args) -> int:
    import torch

    from bench.embed_cache import DEFAULT_MODEL_DIR, EmbedCache, digest

    class Recorded(EmbedCache):
        """The CPU fp32 model's embeddings, keeping every window asked for."""

        def __init__(self, path: Path) -> None:
            super().__init__(path, precision="fp32")
            self.windows: dict[str, np.ndarray] = {}

        def embed(self, xs: list[np.ndarray]) -> np.ndarray:
            self.windows.update((digest(x), x) for x in xs)
            return super().embed(xs)

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    convs = _conversations()
    cache = Recorded(out / "cpu_fp32.npz")
    labels = {d.key: [m["label"] for m in _replay(p, cache)] for d, p in convs}
    cache.save()
    windows = cache.windows
    # The windows come from pcm_s16le frames: int16 holds them exactly.
    np.savez_compressed(
        out / "windows.npz", **{k: _to_s16(x) for k, x in windows.items()}
    )
    (out / "cpu_labels.json").write_text(json.dumps(labels))
    state = torch.load(
        Path(DEFAULT_MODEL_DIR) / "embedding_model.ckpt", map_location="cpu"
    )
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        out / "ecapa_fp16.pt",
    )
    for whl in sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []:
        if whl.name.startswith(WHEEL_PREFIXES):
            shutil.copy(whl, out / whl.name)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"{len(convs)} conversations, {len(windows)} windows, {out}: {size:.1f} MiB")
    return 0


def embed(args) -> int:
    import torch

    from diglett.model.embedder import Embedder, RandomEcapa, pick_device

    src = Path(args.dir)
    device = pick_device(args.device)
    model = RandomEcapa(device)
    state = torch.load(src / "ecapa_fp16.pt", map_location="cpu")
    model.mods["embedding_model"].load_state_dict(
        {k: v.float() for k, v in state.items()}
    )
    embedder = Embedder(model, device)
    z = np.load(src / "windows.npz")
    keys = list(z.files)
    embs = embedder.embed([_from_s16(z[k]) for k in keys])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "gpu_embeddings.npz", **dict(zip(keys, embs)))
    ref = np.load(src / "cpu_fp32.npz")
    cos = [
        float(np.dot(e, ref[k]) / (np.linalg.norm(e) * np.linalg.norm(ref[k])))
        for k, e in zip(keys, embs)
    ]
    meta = {
        "device": device,
        "precision": embedder.precision,
        "windows": len(keys),
        "cosine_to_cpu_fp32": {"mean": float(np.mean(cos)), "min": float(np.min(cos))},
    }
    (out / "gpu_embeddings.json").write_text(json.dumps(meta) + "\n")
    print(json.dumps(meta))
    return 0


def report(args) -> int:
    from bench import cv_decision as cvd

    src = Path(args.dir)
    gpu = _Answers(np.load(args.gpu))
    cpu_labels = json.loads((src / "cpu_labels.json").read_text())
    same = total = 0
    acc: dict[str, list] = {"cpu_fp32": [], "gpu_fp16": []}
    for d, prep in _conversations():
        msgs = _replay(prep, gpu)
        ref = cpu_labels[d.key]
        same += sum(m["label"] == lab for m, lab in zip(msgs, ref))
        total += len(ref)
        acc["gpu_fp16"].append(cvd.score_conv(d, msgs))
        cpu_msgs = [{**m, "label": lab} for m, lab in zip(msgs, ref)]
        acc["cpu_fp32"].append(cvd.score_conv(d, cpu_msgs))
    meta = Path(args.gpu).with_suffix(".json")
    res = {
        "embedded": json.loads(meta.read_text()) if meta.is_file() else None,
        "hops": total,
        "same_label": same / total,
        "four_class": {k: cvd.pooled(v).accuracy for k, v in acc.items()},
    }
    print(json.dumps(res))
    Path(args.result).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("prepare", "embed", "report"))
    ap.add_argument("--dir", default=str(ROOT / ".agree"), help="what prepare writes")
    ap.add_argument("--device", default="auto", help="embed: cuda, cpu or auto")
    ap.add_argument("--out", default="/tmp/diglett-gpu", help="embed: where to write")
    ap.add_argument("--gpu", default="/tmp/diglett-gpu/gpu_embeddings.npz")
    ap.add_argument(
        "--result",
        default=str(ROOT / "bench" / "results" / "gpu_agreement.json"),
        help="report: where the figures go",
    )
    args = ap.parse_args(argv)
    return {"prepare": prepare, "embed": embed, "report": report}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
