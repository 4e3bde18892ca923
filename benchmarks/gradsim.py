"""GradSim benchmark: exact vs naive per-piece gradients vs the floor, exact and projected at scale, projection dims.

GPT-2-small shape (GPT2Config() defaults, random weights, fp32), all 12 c_proj, prompts of about 24 tokens, or
LLaMA-2-7B's widths with a few blocks (`--shape llama-7b --num-layers 4`). Every case runs in its own process (its
peak memory is its own); ratios are to the floor measured in the same invocation.

    python benchmarks/gradsim.py --threads 2                   # N=256 comparison, exact 1024/4096, projected 20000
    python benchmarks/gradsim.py --threads 2 --sizes --projected-n 0          # the N=256 comparison only
    python benchmarks/gradsim.py --projection-sweep --run-dir runs/tiny-gpt2  # Spearman/error vs k on a real run
    python benchmarks/gradsim.py --projection-sweep --run-dir random:256      # ... on random GPT-2-small pieces
    python benchmarks/gradsim.py --shape llama-7b --num-layers 4 --compare-n 64 --naive-n 0 --sizes \
        --projected-n 0 --device cuda --dtype bfloat16                         # LLaMA-7B-shaped, bf16 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --- the workload ------------------------------------------------------------------------------------------------


def model_config(shape: str, num_layers: int | None):
    """GPT2Config() defaults, or LLaMA-2-7B's published shape (4096 wide, MLP 11008, 32 heads, 32000 tokens);
    `num_layers` cuts the stack to a few blocks (a 7B shape's 32 blocks need 27 GB in fp32)."""
    from transformers import GPT2Config, LlamaConfig

    if shape == "gpt2-small":
        config = GPT2Config()
        if num_layers:
            config.n_layer = num_layers
    else:
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            num_hidden_layers=num_layers or 32,
        )
    return config


def make_model(args) -> Path:
    """A model of `--shape` (and `--num-layers`) with random weights in the work dir, saved like a hub model (a small
    local tokenizer beside it); made once, reused by later invocations."""
    import torch
    from transformers import AutoModelForCausalLM

    from lit_coupling.inject.tokenizer import train_bpe_tokenizer

    directory = args.work_dir / f"{args.shape}-{args.num_layers or 'all'}-random"
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(model_config(args.shape, args.num_layers)).save_pretrained(directory)
        train_bpe_tokenizer(["a b c d e f g"], vocab_size=300).save_pretrained(directory)  # pieces carry their ids
    return directory


def model_size(model_dir: Path) -> tuple[int, int]:
    """(vocabulary, blocks) from the saved config."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["vocab_size"]), int(config.get("n_layer") or config["num_hidden_layers"])


def make_pieces(run_dir: Path, n: int, tokens: int, vocab: int, seed: int = 0) -> Path:
    """n random pieces of `tokens` ± 4 tokens (1–3 of them answer), in the knowledge_pieces.json format."""
    import numpy as np

    from lit_coupling.data.piece import PIECES_FORMAT
    from lit_coupling.outputs import PIECES, write_json

    rng = np.random.default_rng(seed)
    pieces = []
    for i in range(n):
        length = int(rng.integers(tokens - 4, tokens + 5))
        answer = int(rng.integers(1, 4))
        ids = rng.integers(0, vocab, length).tolist()
        pieces.append(
            {
                "id": f"p{i}",
                "hotpot_id": f"r{i // 3}",
                "chain_id": f"r{i // 3}",
                "kind": "hop1",
                "hop": 1,
                "prompt": "",
                "answer": "",
                "subject": "",
                "prompt_ids": ids[:-answer],
                "answer_ids": ids[-answer:],
            }
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / PIECES,
        {
            "format": PIECES_FORMAT,
            "model": {"name": "random"},
            "tokenizer": {"pad_id": 0},
            "source": {"kind": "random benchmark pieces", "seed": seed},
            "pieces": pieces,
        },
        indent=None,
    )
    return run_dir / PIECES


# --- one case, in its own process ---------------------------------------------------------------------------------


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def batches(run_dir: Path, batch_size: int):
    from lit_coupling.data.datamodule import PiecesDataModule

    data = PiecesDataModule(str(run_dir), batch_size=batch_size)
    return list(data.predict_dataloader())


def case_floor(args) -> dict:
    """One batched forward and backward over all pieces, weights frozen, nothing captured. `floor`: the model's plain
    forward (logits everywhere); `floor_window`: the LM head on the answer window only, as GradientModule does."""
    import torch

    from lit_coupling.gradients.module import TargetHooks, backward_log_prob
    from lit_coupling.models.adapters import ModelAdapter
    from lit_coupling.models.loading import load_model

    lm = load_model(str(args.model_dir), dtype=args.dtype, device=args.device).model.requires_grad_(False)
    adapter = ModelAdapter(lm)
    loader = batches(args.run_dir, args.batch_size)
    start = time.perf_counter()
    with TargetHooks(list(adapter.targets.values()), keep=False):
        for batch in loader:
            backward_log_prob(lm, batch, args.device, window=args.case == "floor_window")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start}


def run_tool(args, mode: str, out_dir: Path, **module_kwargs) -> dict:
    """The real path: GradientModule + GradSimWriter under a Trainer; times from coupling_analysis.json."""
    from lit_coupling.data.datamodule import PiecesDataModule
    from lit_coupling.gradients.module import GradientModule
    from lit_coupling.gradients.options import GradSimOptions
    from lit_coupling.gradients.reduce import reduce_predict_job
    from lit_coupling.gradients.writer import GradSimWriter
    from lit_coupling.models.options import ModelOptions
    from lit_coupling.trainer import build_trainer

    options = GradSimOptions(mode=mode, reduce_memory_gb=args.memory_gb, **module_kwargs)
    module = GradientModule(ModelOptions(model_path=str(args.model_dir), dtype=args.dtype), options)
    writer = GradSimWriter(output_dir=str(out_dir))
    trainer = build_trainer(device=args.device, callbacks=[writer], enable_progress_bar=False)
    data = PiecesDataModule(str(args.run_dir), batch_size=args.batch_size)
    trainer.predict(module, datamodule=data, return_predictions=False)
    reduce_predict_job(trainer, module, writer, data.pieces)
    analysis = json.loads((out_dir / "coupling_analysis.json").read_text())
    timing = analysis["timing"]
    methods = sorted({v["method"] for v in analysis["per_layer"].values()})
    return {
        "seconds": timing["predict_s"] + timing["reduce_s"],
        "predict_s": timing["predict_s"],
        "reduce_s": timing["reduce_s"],
        "methods": methods,
    }


def case_exact(args) -> dict:
    return run_tool(args, "exact", args.out_dir)


def case_projected(args) -> dict:
    return run_tool(args, "projected", args.out_dir, k_in=args.k, k_out=args.k_out or args.k, projection_seed=args.seed)


def case_naive(args) -> dict:
    """A backward per piece with weight gradients on, flatten all 12 layers' gradients, Gram matrix, cosine."""
    import numpy as np
    import torch

    from lit_coupling.data.piece import load_pieces
    from lit_coupling.models.adapters import ModelAdapter
    from lit_coupling.models.loading import load_model
    from lit_coupling.scoring import answer_logprobs, collate_clozes, forward_logits

    lm = load_model(str(args.model_dir), dtype=args.dtype, device=args.device).model.requires_grad_(False)
    weights = [t.module.weight.requires_grad_(True) for t in ModelAdapter(lm).targets.values()]
    pieces, meta = load_pieces(args.run_dir)
    pieces, pad = pieces[: args.n], meta["tokenizer"]["pad_id"]
    size = sum(w.numel() for w in weights)
    flat = torch.empty((len(pieces), size), dtype=weights[0].dtype, device=args.device)
    start = time.perf_counter()
    for i, p in enumerate(pieces):
        batch = {k: v.to(args.device) for k, v in collate_clozes([(p.prompt_ids, p.answer_ids)], pad).items()}
        logp = answer_logprobs(forward_logits(lm, batch), batch["input_ids"], batch["answer_mask"])
        grads = torch.autograd.grad(logp.sum(), weights)
        flat[i] = torch.cat([g.flatten() for g in grads])
    backward_s = time.perf_counter() - start
    gram = flat @ flat.T
    norms = gram.diagonal().sqrt()
    cosine = (gram / torch.outer(norms, norms)).cpu().numpy()
    seconds = time.perf_counter() - start
    np.save(args.out_dir / "naive_cosine.npy", cosine)
    return {
        "seconds": seconds,
        "backward_s": backward_s,
        "gram_s": seconds - backward_s,
        "gradient_gib": flat.numel() * flat.element_size() / 2**30,
    }


CASES = {
    "floor": case_floor,
    "floor_window": case_floor,
    "exact": case_exact,
    "projected": case_projected,
    "naive": case_naive,
}


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = CASES[args.case](args)
    result.update(case=args.case, n=args.n, peak_gib=peak_gib())
    print("RESULT " + json.dumps(result), flush=True)


def run_case(args, case: str, n: int, run_dir: Path, out_dir: Path, **extra) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--n",
        str(n),
        "--run-dir",
        str(run_dir),
        "--out-dir",
        str(out_dir),
        "--model-dir",
        str(args.model_dir),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--memory-gb",
        str(args.memory_gb),
    ]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    # The child's stderr (its per-layer progress) goes to a log beside the case, to follow a long run with tail -f.
    log = out_dir.parent / f"{out_dir.name}.log"
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"case {case} n={n} failed:\n{proc.stdout[-2000:]}\n{log.read_text()[-4000:]}")
    result = json.loads(line[len("RESULT ") :])
    print(
        f"  {case:<10} n={n:<6} {result['seconds']:9.2f} s   peak {result['peak_gib']:.2f} GiB",
        file=sys.stderr,
        flush=True,
    )
    return result


# --- the tables ---------------------------------------------------------------------------------------------------


def benchmark(args) -> None:
    import numpy as np

    work = args.work_dir
    args.model_dir = make_model(args)
    vocab, layers = model_size(args.model_dir)
    print(
        f"GradSim benchmark: {args.shape} shape (random weights), all {layers} MLP output projections, "
        f"T≈{args.tokens}, {args.dtype}, "
        f"{args.device}, {args.threads} threads, batch {args.batch_size}; load average before: "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows: list[tuple] = []
    first = args.compare_n
    run_first = work / f"pieces-{first}"
    make_pieces(run_first, first, args.tokens, vocab)
    # The floor brackets the other cases, so a change of machine load shows as two different floor times.
    floor_a = run_case(args, "floor", first, run_first, work / "floor")
    exact = run_case(args, "exact", first, run_first, work / f"exact-{first}")
    window = run_case(args, "floor_window", first, run_first, work / "floor")
    naive = run_case(args, "naive", min(args.naive_n, first), run_first, work / "naive") if args.naive_n else None
    floor_b = run_case(args, "floor", first, run_first, work / "floor")
    floor_per_piece = (floor_a["seconds"] + floor_b["seconds"]) / 2 / first
    floor_peak = max(floor_a["peak_gib"], floor_b["peak_gib"])

    def row(name, n, seconds, peak, note=""):
        rows.append((name, n, seconds, seconds / n, seconds / (floor_per_piece * n), peak, note))

    row(
        "floor (batched fwd+bwd, frozen)",
        first,
        floor_per_piece * first,
        floor_peak,
        f"two runs: {floor_a['seconds']:.1f} s, {floor_b['seconds']:.1f} s",
    )
    row(
        "floor, LM head on the answer window",
        first,
        window["seconds"],
        window["peak_gib"],
        "the forward GradientModule uses",
    )
    row(
        "exact (GradientModule)",
        first,
        exact["seconds"],
        exact["peak_gib"],
        f"{'/'.join(exact['methods'])}; predict {exact['predict_s']:.1f} s + reduce {exact['reduce_s']:.1f} s",
    )
    if naive:
        m = naive["n"]
        # The naive per-piece cost is measured; its Gram part grows as N², scaled from the measured one.
        naive_n = naive["backward_s"] / m * first + naive["gram_s"] * (first / m) ** 2
        row(
            f"naive per-piece (measured n={m})",
            m,
            naive["seconds"],
            naive["peak_gib"],
            f"{naive['gradient_gib']:.1f} GiB of flat gradients",
        )
        row(
            "naive per-piece (extrapolated)",
            first,
            naive_n,
            naive["gradient_gib"] * first / m,
            f"needs {naive['gradient_gib'] / m * first:.0f} GiB of flat gradients",
        )
        exact_cos = np.load(work / f"exact-{first}" / "coupling_matrix.npy")[:m, :m]
        naive_cos = np.load(work / "naive" / "naive_cosine.npy")
        print(
            f"  exact vs naive cosine (fp32 both) on the first {m} pieces: max |Δ| = "
            f"{np.abs(exact_cos - naive_cos).max():.2e}",
            file=sys.stderr,
            flush=True,
        )
    for n in sorted(set(args.sizes) - {first}):
        run_dir = work / f"pieces-{n}"
        make_pieces(run_dir, n, args.tokens, vocab)
        e = run_case(args, "exact", n, run_dir, work / f"exact-{n}")
        row(
            "exact (GradientModule)",
            n,
            e["seconds"],
            e["peak_gib"],
            f"predict {e['predict_s']:.1f} s + reduce {e['reduce_s']:.1f} s",
        )
        shutil.rmtree(work / f"exact-{n}", ignore_errors=True)  # GBs of per-layer inner products
    if args.projected_n:
        n = args.projected_n
        run_dir = work / f"pieces-{n}"
        make_pieces(run_dir, n, args.tokens, vocab)
        p = run_case(args, "projected", n, run_dir, work / f"projected-{n}", k=args.k)
        row(
            f"projected {args.k}×{args.k}",
            n,
            p["seconds"],
            p["peak_gib"],
            f"predict {p['predict_s']:.1f} s + reduce {p['reduce_s']:.1f} s",
        )
        shutil.rmtree(work / f"projected-{n}", ignore_errors=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print("| method | N | time (s) | s/piece | × floor | peak memory (GiB) | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, n, seconds, per, ratio, peak, note in rows:
        print(f"| {name} | {n} | {seconds:.1f} | {per:.4f} | {ratio:.2f} | {peak:.2f} | {note} |")
    print(
        f"\nexact at N={first}: {exact['seconds'] / (floor_per_piece * first):.2f}× the floor, "
        f"{exact['seconds'] / window['seconds']:.2f}× its own forward/backward (the answer-window floor)"
    )
    if naive:
        per_piece = naive["seconds"] / naive["n"] / (exact["seconds"] / first)
        print(
            f"exact is {naive_n / exact['seconds']:.1f}× faster than naive at N={first} "
            f"(measured at n={naive['n']}: {per_piece:.1f}× per piece)"
        )


# --- projection dims ----------------------------------------------------------------------------------------------


def projection_sweep(args) -> None:
    """Spearman correlation and mean abs error of projected vs exact GradSim, against k, on one run's pieces."""
    import numpy as np
    from scipy.stats import spearmanr

    from lit_coupling.data.piece import load_pieces

    work = args.work_dir / "sweep"
    if str(args.run_dir).startswith("random:"):
        n = int(str(args.run_dir).split(":")[1])
        args.model_dir = make_model(args)
        args.run_dir = work / f"pieces-{n}"
        make_pieces(args.run_dir, n, args.tokens, model_size(args.model_dir)[0])
    pieces, meta = load_pieces(args.run_dir)
    if args.model_dir is None:
        args.model_dir = meta.get("model", {}).get("name")
        if not args.model_dir:
            raise SystemExit("--model-dir is needed: the pieces file names no model")
    print(
        f"projection sweep on {args.run_dir} ({len(pieces)} pieces), model {args.model_dir}, {args.dtype}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    exact = run_case(args, "exact", len(pieces), args.run_dir, work / "exact")
    want = np.load(work / "exact" / "coupling_matrix.npy").astype(np.float64)
    upper = np.triu_indices(len(pieces), 1)
    print(
        f"\nexact: {exact['seconds']:.1f} s; mean |GradSim| over pairs {np.abs(want[upper]).mean():.4f}, "
        f"std {want[upper].std():.4f}\n"
    )
    print("| k_in × k_out | Spearman (mean over seeds) | min Spearman | mean abs error | time (s) | × exact time |")
    print("|---|---:|---:|---:|---:|---:|")
    for dims in args.ks:
        k_in, _, k_out = dims.partition("x")
        k_in, k_out = int(k_in), int(k_out or k_in)
        rhos, errors, seconds = [], [], []
        for seed in range(args.seeds):
            out = work / f"projected-{k_in}x{k_out}-{seed}"
            r = run_case(args, "projected", len(pieces), args.run_dir, out, k=k_in, k_out=k_out, seed=seed)
            got = np.load(out / "coupling_matrix.npy").astype(np.float64)
            rhos.append(spearmanr(got[upper], want[upper])[0])
            errors.append(np.abs(got[upper] - want[upper]).mean())
            seconds.append(r["seconds"])
        print(
            f"| {k_in}×{k_out} | {np.mean(rhos):.4f} | {np.min(rhos):.4f} | {np.mean(errors):.4f} | "
            f"{np.mean(seconds):.1f} | {np.mean(seconds) / exact['seconds']:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every case (default 2)")
    parser.add_argument(
        "--shape",
        choices=["gpt2-small", "llama-7b"],
        default="gpt2-small",
        help="model shape, random weights (llama-7b: LLaMA-2-7B's widths)",
    )
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="blocks in the model (default: the shape's own; a few for llama-7b on small memory)",
    )
    parser.add_argument("--tokens", type=int, default=24, help="mean tokens per piece (prompt + answer)")
    parser.add_argument("--compare-n", type=int, default=256, help="N of the exact vs naive vs floor comparison")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096], help="more N for exact")
    parser.add_argument(
        "--naive-n",
        type=int,
        default=32,
        help="pieces the naive approach is measured on (GPT-2 small: 113 MB of gradients each); 0 skips it",
    )
    parser.add_argument("--projected-n", type=int, default=20000, help="N of the projected run (0 skips it)")
    parser.add_argument("--k", type=int, default=64, help="projection dims k_in = k_out of the projected run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="reduction: resident data per layer")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/lit_coupling_bench"))
    parser.add_argument("--projection-sweep", action="store_true", help="Spearman/error of projected vs exact")
    parser.add_argument("--run-dir", type=Path, help="sweep: a run directory (knowledge_pieces.json) or random:N")
    parser.add_argument("--model-dir", type=Path, help="sweep: the model (default: the one the pieces name)")
    parser.add_argument(
        "--ks",
        nargs="+",
        default=["16", "32", "64", "128", "256"],
        help="projection dims to sweep: k (k_in = k_out) or k_inxk_out, e.g. 128x32",
    )
    parser.add_argument("--seeds", type=int, default=2)
    # one case in a child process
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--k-out", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child_main(args)
    elif args.projection_sweep:
        if args.run_dir is None:
            parser.error("--projection-sweep needs --run-dir (a run directory or random:N)")
        projection_sweep(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
