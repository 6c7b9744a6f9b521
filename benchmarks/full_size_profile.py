"""Profiles of the full-size prompt pass (``means``) and fast AIE (``full_size.py --profile DIR``).

    python benchmarks/full_size.py --work /tmp/of4b --profile /tmp/prof --layers 4

``torch.profiler`` over one run of each stage after one warm-up run; two tables per stage
under DIR (by operator, and by operator and input shapes, by self CPU time). With
``--layers N`` the language model keeps its first N layers (full width; the others are
dropped after loading): a shared machine's hot spots in seconds instead of minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

from full_size import RELATIONS, load_release, samplers


def profile(family: str, work: Path, device: str, dtype: str, layers: int | None, prompts: int, out: Path) -> None:
    """torch.profiler tables of the prompt pass (means) and fast AIE, one warm-up run each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    from mfv.data.episodes import encode_episodes
    from mfv.method.aie import indirect_effects, mean_head_activations

    eval_sampler, _ = samplers(work, 1)
    model = load_release(family, work / "release", device, dtype, layers)
    clean = encode_episodes(model, [eval_sampler.draw(i, "clean") for i in range(prompts)], RELATIONS)
    corrupted = encode_episodes(model, [eval_sampler.episode(0, "corrupted")], RELATIONS)
    means = mean_head_activations(model, [clean], len(RELATIONS), progress=False).means  # warm-up
    work_of = {"means": lambda: mean_head_activations(model, [clean], len(RELATIONS), progress=False),
               "aie_fast": lambda: indirect_effects(model, corrupted, means, "fast")}
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in work_of.items():
        if name != "means":
            fn()  # warm-up
        start = time.perf_counter()
        with profiler(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        wall = time.perf_counter() - start
        averages = prof.key_averages()
        text = (f"{family} {name}: {wall:.2f} s profiled, layers kept: {layers or 'all'}, dtype {dtype}\n"
                + averages.table(sort_by="self_cpu_time_total", row_limit=40) + "\n"
                + prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))
        (out / f"{family}_{name}.txt").write_text(text)
        print(text[:4000], flush=True)
