"""The README's measured tables, rendered from the results files that measured them.

  python experiments/render_results.py           # rewrite the README's results blocks
  python experiments/render_results.py --check   # exit 1 where a block and its file disagree

A results block in the README is the lines between `<!-- results/NAME.json -->` and
`<!-- end results -->`: this script owns them (edit the results file's command, rerun
it, then render). Each table names its machine, date, versions and command.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- (results/[\w.-]+\.json) -->\n)(.*?)(<!-- end results -->)", re.S)


def _source(res: dict) -> str:
  v = res["versions"]
  libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch") if k in v)
  return (f"Measured on {res['machine']['summary']} ({res['machine']['backend']}), "
          f"{res['date'][:10]}, {libs}, by `{res['command']}`.")


def _ms(r: dict, key: str = "s") -> str:
  """median (min-max) in ms."""
  return (f"{1e3 * r[f'{key}_median']:.1f} ({1e3 * r[f'{key}_min']:.1f}-"
          f"{1e3 * r[f'{key}_max']:.1f})")


def cpu_benchmark(res: dict) -> str:
  rows = res["rows"]
  train = [r for r in rows if r["table"] == "train" and "error" not in r]
  r0 = train[0]
  out = [_source(res), "",
         f"One NoProp-DT training step, {r0['dataset']} shapes, batch {r0['batch_size']}, "
         f"T = {r0['T']}, {r0['precision']}; ms per step: median (min-max) of "
         f"{res['settings']['repeats']} steps (Algorithm 1: of {res['settings']['repeats']} x T); "
         f"matmul peak {res['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s.", "",
         "| case | resolved | ms per step | examples/s | x Algorithm 1 | % of matmul peak | XLA temp MiB |",
         "|---|---|---:|---:|---:|---:|---:|"]
  for r in train:
    t = {q: r[f"s_{q}"] for q in ("min", "median", "max")}
    ms = _ms({f"s_{q}": v for q, v in t.items()})
    if r["kind"] == "algorithm1":
      ms += f" x {r['T']} = {r['ms_per_T_steps']:.1f}"
    # A loop's body counts once in XLA's FLOPs: no share of the peak for a lower bound.
    exact = r.get("frac_matmul_peak") and not r["flops_source"].startswith("lower bound")
    pct = f"{100 * r['frac_matmul_peak']:.1f}" if exact else "n/a (a loop)"
    out.append(f"| {r['name']} | {r['resolved']} | {ms} | {r['examples_per_s']:.1f} | "
               f"{r['x_algorithm1']:.2f} | {pct} | {r['xla_temp_mib']:.1f} |")
  auto = next((r for r in rows if r["table"] == "auto"), None)
  if auto:
    out += ["", f"`auto` picked {auto['picked']}; the fastest parallel row was {auto['fastest']} "
            f"({auto['fastest_resolved']}): auto took {auto['auto_over_fastest']:.2f}x its time, "
            f"{'within' if auto['within'] else 'not within'} {auto['tolerance']:.0%}."]
  torch = [r for r in rows if r["table"] == "torch" and "error" not in r]
  if torch:
    out += ["", f"Against the PyTorch per-block loop (torch {torch[0]['torch_version']}, "
            f"{torch[0]['threads']} threads, its own process), timed alternately in "
            f"{res['settings']['rounds']} rounds; ms: median (min-max):", "",
            "| | noprop_jax ms | PyTorch ms | PyTorch / noprop_jax |", "|---|---:|---:|---:|"]
    names = {"step": "training: all T blocks once", "block_step": "training: one block's step",
             "dt_predict": "NoProp-DT inference, one batch",
             "fm_predict": f"NoProp-FM inference, {res['settings']['torch_fm_steps']} Euler steps"}
    for r in torch:
      jax_ms = _ms({"s_median": r["jax_s"], "s_min": r["jax_s_min"], "s_max": r["jax_s_max"]})
      t_ms = _ms({"s_median": r["torch_s"], "s_min": r["torch_s_min"], "s_max": r["torch_s_max"]})
      out.append(f"| {names[r['case']]} | {jax_ms} | {t_ms} | {r['speedup']:.2f}x |")
  return "\n".join(out) + "\n"


def cpu_memory(res: dict) -> str:
  rows = [r for r in res["rows"] if "case" in r]
  cost = next((r for r in res["rows"] if r.get("table") == "remat_cost"), None)
  r0 = rows[0]
  out = [_source(res), "",
         f"Memory of one training step, {r0['dataset']} shapes, batch {r0['batch_size']}: XLA's "
         "compiled memory analysis (peak = arguments + outputs - aliased + temporaries), MiB; "
         "the ratios are of peaks.", "",
         "| case | temporaries | peak | / backprop | / backprop rematerialised |",
         "|---|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r['case']} | {r['temp'] / 2**20:.1f} | {r['peak'] / 2**20:.1f} | "
               f"{r['ratio_to_backprop']:.2f} | {r['ratio_to_remat']:.2f} |")
  if cost:
    out += ["", f"Step time, median (min-max) of {cost['repeats']} steps each, timed alternately: "
            f"backprop {_ms(cost, 'backprop_s')} ms, rematerialised per block "
            f"{_ms(cost, 'remat_s')} ms: rematerialisation costs "
            f"{cost['remat_over_backprop']:.2f}x the step time."]
  return "\n".join(out) + "\n"


RENDERERS = {"results/cpu_benchmark.json": cpu_benchmark,
             "results/cpu_benchmark_cifar10.json": cpu_benchmark,
             "results/cpu_memory.json": cpu_memory}


def render(text: str, root: Path = ROOT) -> str:
  """`text` with every results block rendered from its file (under `root`)."""
  def one(m):
    name = m.group(2)
    if name not in RENDERERS:
      raise SystemExit(f"no renderer for {name}; known: {sorted(RENDERERS)}")
    res = json.loads((root / name).read_text())
    return m.group(1) + RENDERERS[name](res) + m.group(4)
  return BLOCK.sub(one, text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--check", action="store_true", help="only compare; exit 1 where they disagree")
  p.add_argument("--page", type=Path, default=ROOT / "README.md")
  args = p.parse_args(argv)
  text = args.page.read_text()
  new = render(text, args.page.parent)
  if args.check:
    if new != text:
      print(f"{args.page}: a results block differs from its results file; run "
            "python experiments/render_results.py", file=sys.stderr)
      return 1
    return 0
  args.page.write_text(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
