"""The documentation's generated blocks: measured tables rendered from the results files
that measured them, and the command line's tables rendered from the settings.

  python experiments/render_results.py           # rewrite every page's generated blocks
  python experiments/render_results.py --check   # exit 1 where a block and its source disagree

The pages are README.md and every docs/**/*.md. Blocks this script owns:
- `<!-- results/NAME.json -->` ... `<!-- end results -->`: tables of that results file, in
  the form of the script that wrote it (the command the file records);
  `<!-- results/NAME.json VIEW -->` for another view of it, e.g. `headline`. To change
  one, rerun the command the file records, then render. Each names its machine, date,
  versions and command.
- `<!-- flags -->` ... `<!-- /flags -->`: every flag of experiments/train.py.
- `<!-- settings METHOD -->` ... `<!-- /settings -->`: one method's own settings.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare, continual (tables)
BLOCK = re.compile(r"(<!-- (results/[\w.-]+\.json)(?: (\w+))? -->\n)(.*?)(<!-- end results -->)",
                   re.S)
FLAGS = re.compile(r"(<!-- flags -->\n)(.*?)(<!-- /flags -->)", re.S)
SETTINGS = re.compile(r"(<!-- settings (\w+) -->\n)(.*?)(<!-- /settings -->)", re.S)


def _source(res: dict) -> str:
  v = res["versions"]
  libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch") if k in v)
  return (f"Measured on {res['machine']['summary']} ({res['machine']['backend']}), "
          f"{res['date'][:10]}, {libs}, by `{res['command']}`.")


def _ms(r: dict, key: str = "s") -> str:
  """median (min-max) in ms."""
  return (f"{1e3 * r[f'{key}_median']:.1f} ({1e3 * r[f'{key}_min']:.1f}-"
          f"{1e3 * r[f'{key}_max']:.1f})")


def _timed(res: dict, r0: dict) -> str:
  """How many steps each row's time is the median of, and how they were taken."""
  n, rounds = res["settings"]["repeats"], r0.get("rounds", 1)
  steps = f"{n} steps (Algorithm 1: {n} x T)"
  return (f"{rounds} rounds of {steps}, the rows taking turns round by round;" if rounds > 1
          else f"{steps};")


TORCH_ITEMS = {"step": "training: all T blocks once", "block_step": "training: one block's step",
               "dt_predict": "NoProp-DT inference, one batch"}


def _auto(check: dict, where: str = "") -> str:
  """The auto check's sentence: what `auto` picked against the fastest configuration."""
  return (f"`auto`{where} picked {check['picked']}; the fastest parallel row was "
          f"{check['fastest']} ({check['fastest_resolved']}): auto took "
          f"{check['auto_over_fastest']:.2f}x its time, "
          f"{'within' if check['within'] else 'not within'} {check['tolerance']:.0%}.")


def cpu_benchmark(res: dict, view: str | None = None) -> str:
  rows = res["rows"]
  train = [r for r in rows if r["table"] == "train" and "error" not in r]
  r0 = train[0]
  out = [_source(res), "",
         f"One NoProp-DT training step, {r0['dataset']} shapes, batch {r0['batch_size']}, "
         f"T = {r0['T']}, {r0['precision']}; ms per step: median (min-max) of {_timed(res, r0)} "
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
    out += ["", _auto(auto)]
  torch = [r for r in rows if r["table"] == "torch" and "error" not in r]
  if torch:
    out += ["", f"Against the PyTorch per-block loop (torch {torch[0]['torch_version']}, "
            f"{torch[0]['threads']} threads, its own process), timed alternately in "
            f"{res['settings']['rounds']} rounds; ms: median (min-max):", "",
            "| | noprop_jax ms | PyTorch ms | PyTorch / noprop_jax |", "|---|---:|---:|---:|"]
    names = {**TORCH_ITEMS,
             "fm_predict": f"NoProp-FM inference, {res['settings']['torch_fm_steps']} Euler steps"}
    for r in torch:
      jax_ms = _ms({"s_median": r["jax_s"], "s_min": r["jax_s_min"], "s_max": r["jax_s_max"]})
      t_ms = _ms({"s_median": r["torch_s"], "s_min": r["torch_s_min"], "s_max": r["torch_s_max"]})
      out.append(f"| {names[r['case']]} | {jax_ms} | {t_ms} | {r['speedup']:.2f}x |")
  return "\n".join(out) + "\n"


def cpu_memory(res: dict, view: str | None = None) -> str:
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


def _pct(v: float | None) -> str:
  return "n/a" if v is None else f"{100 * v:.2f}"


def compare(res: dict, view: str | None = None) -> str:
  """Every method side by side (`experiments/compare.py --results`); view `headline`: the
  accuracy columns only."""
  import compare as compare_script
  rows, st = res["rows"], res["settings"]
  epochs = st["epochs"]
  what = (f"{st['dataset']}, {epochs or 'the default number of'} "
          f"{'epoch' if epochs == 1 else 'epochs'} per row, batch {st['batch_size']}, seed "
          f"{st['seed']}" + (f", {st['inference_steps']} Euler steps at inference for CT and FM"
                             if st.get("inference_steps") else "") +
          ("; the adjoint solves with its own steps in training and inference"
           if "adjoint" in st["methods"] else "") + "; sampled: one sampled run")
  if view == "headline":
    from noprop_jax import method as methods
    out = [_source(res), "", f"Test accuracy, %: {what}.", "",
           "| method | block | mean path | sampled |", "|---|---|---:|---:|"]
    out += [f"| {methods.get(r['method']).title} | {r['block']} | {_pct(r['test_accuracy'])} | "
            f"{_pct(r.get('test_accuracy_stochastic'))} |" for r in rows]
    return "\n".join(out) + "\n"
  return "\n".join([_source(res), "", f"{what}; one training run per row (its seconds per "
                    "epoch are that run's).", "", compare_script.table(rows)]) + "\n"


def continual(res: dict, view: str | None = None) -> str:
  """Tasks learnt one after another (`experiments/continual.py --results`)."""
  import continual as continual_script
  st = res["settings"]
  return "\n".join([_source(res), "", f"{st['scenario']} {st['dataset']}, batch "
                    f"{st['batch_size']}, lr {st['lr']}; mean ± standard error over "
                    f"{st['seeds']} seeds, in %.", "", continual_script.table(res["rows"])]) + "\n"


def precision(res: dict, view: str | None = None) -> str:
  """bfloat16 against float32, paired by seed (`experiments/precision_check.py --out`)."""
  rows, st = res["rows"], res["settings"]
  from noprop_jax import method as methods
  epochs = rows[0]["epochs"]
  out = [_source(res), "", f"{st['dataset']}, {st['n_train']:,} training examples, {epochs:g} "
         f"{'epoch' if epochs == 1 else 'epochs'}; test accuracy, mean ± sd over seeds; bf16 - "
         "f32: the mean of the paired differences ± its standard error. (On a CPU bfloat16 is "
         "emulated: this measures accuracy, not speed.)", "",
         "| method | inference | float32 | bfloat16 | bf16 - f32 | seeds |",
         "|---|---|---:|---:|---:|---:|"]
  from precision_check import paired
  for method in dict.fromkeys(r["method"] for r in rows):
    for key, name in (("test_accuracy_mean_path", "mean path"),
                      ("test_accuracy_stochastic", "sampled")):
      c = paired(rows, method, key)
      out.append(f"| {methods.get(method).title} | {name} | {c['float32'][0]:.4f} ± "
                 f"{c['float32'][1]:.4f} | {c['bfloat16'][0]:.4f} ± {c['bfloat16'][1]:.4f} | "
                 f"{c['diff'][0]:+.4f} ± {c['diff'][1]:.4f} | {c['seeds']} |")
  return "\n".join(out) + "\n"


def inference(res: dict, view: str | None = None) -> str:
  """CT/FM inference, hoisted against the whole block (`experiments/inference_benchmark.py --out`)."""
  rows, st = res["rows"], res["settings"]
  ms = lambda r, k: (f"{r[f'{k}_ms_per_image']:.3f} ({r[f'{k}_ms_per_image_min']:.3f}-"
                     f"{r[f'{k}_ms_per_image_max']:.3f})")
  out = [_source(res), "", f"NoProp-{st['method'].upper()} trained on {st['dataset']} (step "
         f"{st['trained_step']} of its run), {st['timed_images']} test images timed; ms per image: "
         f"median (min-max) of up to {st['repeats']} calls. Accuracy: the whole test split, mean "
         "path (sampled: one run).", "",
         "| Euler steps | hoisted | naive | per step | per step / hoisted | naive / hoisted | "
         "test acc | sampled |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r['steps']} | {ms(r, 'hoisted')} | {ms(r, 'naive')} | {ms(r, 'per_step')} | "
               f"{r['speedup_vs_per_step']:.1f}x | {r['speedup_vs_naive']:.1f}x | "
               f"{_pct(r['test_accuracy'])} | {_pct(r['test_accuracy_stochastic'])} |")
  return "\n".join(out) + "\n"


def accelerator(res: dict, view: str | None = None) -> str:
  """The accelerator benchmark (`experiments/accelerator_benchmark.py`): training rows,
  the auto check, inference, the T-curve and the PyTorch loop on the same device."""
  st, rows = res["settings"], res["rows"]
  ok = lambda table: [r for r in rows if r["table"] == table and "error" not in r and "skipped" not in r]
  mib = lambda b: f"{b / 2**20:.1f}" if b else "n/a"
  group = lambda r: (r["dataset"], r["precision"])
  out = [_source(res), "",
         f"Batch {st['batch_size']}, the paper's block, random data of each dataset's shapes. "
         f"ms: median (min-max) of {st['rounds']} rounds of {st['repeats']} calls, each round "
         "after a warm-up; a training row's time is one update of every block (Algorithm 1: T "
         "of its steps). Device peak: the row's own process (n/a: not reported); XLA peak: "
         f"its memory analysis. The whole run took {res['seconds']['total'] / 60:.1f} min.", "",
         f"Training, T = {st['T']}:", "",
         "| shapes | precision | case | resolved | ms per T block updates | x Algorithm 1 | "
         "device peak MiB | XLA peak MiB |", "|---|---|---|---|---:|---:|---:|---:|"]
  train = ok("train")
  alg1 = {group(r): r for r in train if r["case"] == "algorithm1"}
  for r in train:
    a = alg1.get(group(r))
    x = f"{a['s_per_T_updates_median'] / r['s_per_T_updates_median']:.2f}" if a else "n/a"
    out.append(f"| {r['dataset']} | {r['precision']} | {r['name']} | {r['resolved']} | "
               f"{_ms(r, 's_per_T_updates')} | {x} | {mib(r['device_peak_bytes'])} | "
               f"{mib(r['xla_peak_bytes'])} |")
  out += [f"| {r['dataset']} | {r['precision']} | {r['case']} | failed: {r['error']} | | | | |"
          for r in rows if r["table"] == "train" and "error" in r]
  out += [""] + ["- " + _auto(r, f" on {r['dataset']} {r['precision']}") for r in ok("auto")]
  out += ["", f"Inference, one batch, mean path (FM: {st['inference_steps']} Euler steps):", "",
          "| shapes | precision | method | ms per batch |", "|---|---|---|---:|"]
  out += [f"| {r['dataset']} | {r['precision']} | {r['name']} | {_ms(r)} |" for r in ok("inference")]
  curve = ok("t_curve")
  if curve:
    out += ["", "Step time as T grows: the parallel step (auto) against T Algorithm-1 steps, "
            "the two taking turns at each T; ms per T block updates:", "",
            "| shapes | precision | T | parallel step | T x Algorithm 1 | speed-up |",
            "|---|---|---:|---:|---:|---:|"]
    pairs = {}
    for r in curve:
      pairs.setdefault((*group(r), r["T"]), {})[r["case"]] = r
    for (dataset, precision, T), pair in pairs.items():
      par, a = pair.get("auto"), pair.get("algorithm1")
      if par and a:
        out.append(f"| {dataset} | {precision} | {T} | {_ms(par, 's_per_T_updates')} | "
                   f"{_ms(a, 's_per_T_updates')} | "
                   f"{a['s_per_T_updates_median'] / par['s_per_T_updates_median']:.2f}x |")
  torch = ok("torch")
  if torch:
    ours = {("step", *group(r)): r for r in train if r["case"] == "auto"}
    ours |= {("block_step", *group(r)): r for r in train if r["case"] == "algorithm1"}
    ours |= {("dt_predict", *group(r)): r for r in ok("inference") if r["case"] == "dt"}
    out += ["", f"Against the PyTorch per-block loop (torch {torch[0]['torch']}, on "
            f"{torch[0]['torch_device']}), float32; ms: median (min-max):", "",
            "| shapes | | noprop_jax | PyTorch | PyTorch / noprop_jax |", "|---|---|---:|---:|---:|"]
    for r in torch:
      mine = ours.get((r["case"], r["dataset"], "float32"))
      if r["case"] == "fm_predict" or mine is None:
        continue
      key = "s_per_T_updates" if r["case"] == "step" else "s"
      out.append(f"| {r['dataset']} | {TORCH_ITEMS[r['case']]} | {_ms(mine, key)} | {_ms(r)} | "
                 f"{r['s_median'] / mine[f'{key}_median']:.2f}x |")
    fm = [r for r in torch if r["case"] == "fm_predict"]
    out += [f"\nPyTorch's NoProp-FM inference ({st['torch_fm_steps']} Euler steps, the whole "
            f"block at each, {st['torch_fm_batch']} images) on {r['dataset']}: {_ms(r)} ms." for r in fm]
  out += [f"\nPyTorch on {r['dataset']}: {r['skipped']}." for r in rows if r["table"] == "torch"
          and "skipped" in r]
  return "\n".join(out) + "\n"


# A results file records the command that wrote it; its script picks the renderer.
RENDERERS = {"benchmark.py": cpu_benchmark, "memory_benchmark.py": cpu_memory,
             "compare.py": compare, "continual.py": continual, "precision_check.py": precision,
             "inference_benchmark.py": inference, "accelerator_benchmark.py": accelerator}


def renderer(res: dict, name: str):
  """The renderer of a results file, by the script its command ran."""
  words = res.get("command", "").split()  # python experiments/SCRIPT.py ...
  script = Path(words[1]).name if len(words) > 1 else None
  if script not in RENDERERS:
    raise SystemExit(f"{name}: no renderer for results written by {res.get('command')!r}; "
                     f"known scripts: {sorted(RENDERERS)}")
  return RENDERERS[script]


def pages(root: Path = ROOT) -> list[Path]:
  """README.md and every page of the documentation."""
  return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render(text: str, root: Path = ROOT) -> str:
  """`text` with every generated block rendered from its source (results under `root`)."""
  from noprop_jax import cli

  def results(m):
    name, view = m.group(2), m.group(3)
    if not (root / name).is_file():
      raise SystemExit(f"{name} does not exist: run the command that writes it (named beside its "
                       "block), then render")
    res = json.loads((root / name).read_text())
    return m.group(1) + renderer(res, name)(res, view) + m.group(5)

  text = BLOCK.sub(results, text)
  text = FLAGS.sub(lambda m: m.group(1) + cli.flag_table() + "\n" + m.group(3), text)
  return SETTINGS.sub(lambda m: m.group(1) + cli.method_table(m.group(2)) + "\n" + m.group(4),
                      text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--check", action="store_true", help="only compare; exit 1 where they disagree")
  p.add_argument("--page", type=Path, action="append", default=None,
                 help="a page (may repeat; default: README.md and docs/**/*.md); results paths "
                 "are read relative to the page's repository root (the folder holding results/)")
  args = p.parse_args(argv)
  stale = []
  for page in args.page or pages():
    root = next(d for d in [page.parent, *page.parents] if (d / "results").is_dir()
                or d == Path(d.anchor))
    text = page.read_text()
    new = render(text, root)
    if new == text:
      continue
    if args.check:
      stale.append(page)
    else:
      page.write_text(new)
  for page in stale:
    print(f"{page}: a generated block differs from its source (results file or settings); run "
          "python experiments/render_results.py", file=sys.stderr)
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
