"""benchmarks/quality.py: the variant table, aggregation over seeds, paired differences, resume
bookkeeping and the generated report section, on constructed numbers (no training)."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from launch.train_config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
spec = importlib.util.spec_from_file_location("quality_ablation", SCRIPT)
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)

SETTINGS = {"config": "cpu-demo", "steps": 200, "batch_size": 64, "num_procs": 1,
            "extra_overrides": [], "data": "/data", "train_pairs": 1911}


def make_result(variant, seed, top1, text_busiest=None, text_drop=0.0, experts=4, settings=SETTINGS):
    """A results file as run_one writes it, with the same top-1 at every granularity."""
    zeroshot = {g: {"granularity": g, "classes": c, "images": 100, "top1": top1, "top5": min(1.0, 2 * top1),
                    "chance_top1": 1 / c, "chance_top5": min(5, c) / c}
                for g, c in zip(quality.GRANULARITIES, (1910, 99, 10))}
    routing = None
    if text_busiest is not None:
        summary = {"image": {"drop_rate": 0.1, "mean_entropy": 1.0, "busiest_expert_share": 0.3,
                             "min_experts_used": experts},
                   "text": {"drop_rate": text_drop, "mean_entropy": 0.5, "busiest_expert_share": text_busiest,
                            "min_experts_used": 1 if text_busiest > 0.9 else experts}}
        routing = {"num_experts": experts, "capacity_factor": 1.0, "pairs": 100, "summary": summary, "layers": []}
    return {"variant": variant, "seed": seed, "settings": settings, "zeroshot": zeroshot, "routing": routing,
            "parameters": {"total": 2e6, "experts": 1e6, "active_per_token": 1.2e6},
            "training": {"steps_logged": 200, "tail_steps": 20, "contrastive_loss": 2.0, "samples_per_s": 150.0},
            "seconds": {"train": 90.0, "evaluate": 30.0, "total": 120.0},
            "load_average": {"start": 1.0, "end": 2.0}, "date": f"2026-01-01T00:0{seed}:00+00:00",
            "machine": {"cpu_count": 2, "cpu": "test cpu"}}


def test_every_variant_is_a_valid_cpu_demo_config_with_the_intended_model():
    from limoe.config import TwoTowerConfig

    models = {}
    for variant in quality.VARIANTS:
        overrides = quality.run_overrides(variant, 3, SETTINGS) + [("name", f"check-{variant}")]
        config = load_config("cpu-demo", overrides)
        assert config.seed == 3 and config.train.batch_size == 64 and config.parallel.ep_size == 1
        models[variant] = config.model
        assert quality.variant_tokenizer(variant) in quality.TOKENIZERS
    assert models["dense"].moe.num_experts == 0 and isinstance(models["open_clip"], TwoTowerConfig)
    assert quality.variant_tokenizer("open_clip") == "bpe" and quality.variant_tokenizer("limoe") == "sp1000"
    assert models["limoe"].moe.num_experts == 4 and models["limoe-e8"].moe.num_experts == 8
    limoe = models["limoe"].moe
    assert limoe.text.importance > 0 and limoe.text.load > 0 and limoe.text.global_entropy == 0
    entropy = models["limoe-entropy"].moe
    assert entropy.text.global_entropy > 0 and entropy.text.global_entropy_experts == 2.0
    no_aux = models["limoe-no-aux"].moe
    assert all(getattr(w, name) == 0 for w in (no_aux.image, no_aux.text)
               for name in ("importance", "load", "switch_load", "local_entropy", "global_entropy", "zloss"))
    assert limoe.batch_priority_routing and not models["limoe-no-bpr"].moe.batch_priority_routing
    assert models["open_clip-sp1000"].text_pool == "eos" and models["limoe-cls"].image_pool == "cls"
    # Every variant but the k=2 one spends the demo model's FLOPs per pair (within the class token);
    # the half-width ones (round 20) spend the half-width LIMoE's, a little over a quarter of it.
    from limoe.flops import flops_per_pair

    base = flops_per_pair(models["limoe"])["total"]
    half = flops_per_pair(models[f"{quality.ROUND17_LIMOE}-w64"])["total"]
    assert 0.25 < half / base < 0.3
    # Against the base that pools images alike (a class token is one more image token): within
    # 1 %, which a router over up to 32 experts (0.8 % over 4 experts' at this width) fits.
    by_pool = {pool: flops_per_pair(models[name])["total"] for pool, name in (("map", "limoe"), ("cls", "limoe-cls"))}
    for variant, model in models.items():
        if variant.endswith("-w64"):
            assert model.width == 64 and model.heads == 2 and model.mlp_dim == 256, variant
            assert abs(flops_per_pair(model)["total"] - half) / half < 0.02, variant
        elif variant != "limoe-k2":
            assert model.width == 128, variant
            pool = "cls" if isinstance(model, TwoTowerConfig) else model.image_pool  # open_clip's ViT: a class token
            same = by_pool.get(pool, base)
            assert abs(flops_per_pair(model)["total"] - same) / same < 0.01, variant


def test_the_first_default_variant_is_the_model_the_demo_config_trains():
    """`limoe train --config cpu-demo` (and so `limoe demo`) must train the model the quality
    table reports as the demo's default: a change to one without the other fails here."""
    import dataclasses

    from launch.demo import DEFAULT_TOKENIZER

    variant = quality.DEFAULT_VARIANTS[0]
    demo = load_config("cpu-demo").model
    ablated = load_config("cpu-demo", quality.run_overrides(variant, 0, SETTINGS)).model
    assert dataclasses.asdict(demo) == dataclasses.asdict(ablated)
    assert quality.variant_tokenizer(variant) == DEFAULT_TOKENIZER


def test_variants_measured_before_round_22_keep_their_expert_layout():
    """limoe-nano's expert layout changed in round 22; the rows measured before must still build
    the model they were measured with (MoE in blocks 1 and 3, full-width experts, no shared one)."""
    def model(variant):
        return load_config("cpu-demo", quality.run_overrides(variant, 0, SETTINGS)).model

    for old in ("limoe", quality.ROUND17_LIMOE):
        m = model(old)
        assert m.moe.moe_layers(m.depth) == [1, 3] and m.expert_hidden == m.mlp_dim == 512
        assert m.moe.shared_expert_mlp_dim == 0
    new = model(quality.ROUND22_LIMOE)
    assert new.moe.moe_layers(new.depth) == [2, 3] and new.expert_hidden == 256 and new.moe.num_experts == 16
    assert new.moe.shared_expert_mlp_dim == 256


def test_the_global_batch_is_split_over_processes():
    overrides = dict(quality.run_overrides("limoe", 0, {**SETTINGS, "num_procs": 2}))
    assert overrides["train.batch_size"] == 32 and overrides["parallel.num_procs"] == 2


def test_aggregate_gives_mean_sample_std_min_max_over_seeds_per_variant():
    results = [make_result("limoe-e8", s, t, text_busiest=0.4) for s, t in ((0, 0.10), (1, 0.20), (2, 0.30))]
    results.append(make_result("dense", 0, 0.05))
    summary = quality.aggregate(results)
    assert list(summary) == ["dense", "limoe-e8"]  # VARIANTS order, whatever the file order
    top1 = summary["limoe-e8"]["metrics"]["zeroshot/category/top1"]
    assert top1["mean"] == pytest.approx(0.20) and top1["std"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.3]))
    assert (top1["min"], top1["max"], top1["n"]) == (0.10, 0.30, 3)
    assert summary["limoe-e8"]["seeds"] == [0, 1, 2]
    assert summary["dense"]["metrics"]["zeroshot/name/top1"]["std"] is None  # one seed: no spread
    assert "routing/text/busiest_expert_share" not in summary["dense"]["metrics"]


def test_paired_differences_match_seeds_and_skip_unpaired_ones():
    results = [make_result("limoe", 0, 0.30), make_result("limoe", 1, 0.25), make_result("limoe", 2, 0.90),
               make_result("dense", 0, 0.20), make_result("dense", 1, 0.30)]
    d = quality.paired_differences(results, "limoe", "dense", "zeroshot/category/top1")
    assert d["seeds"] == [0, 1]
    assert d["mean"] == pytest.approx(((0.30 - 0.20) + (0.25 - 0.30)) / 2)
    assert d["first_higher"] == 1 and d["n"] == 2
    # 95 % interval of the mean difference: t(0.975, 1 degree of freedom) = 12.706
    assert d["ci95"] == pytest.approx(12.706 * d["std"] / 2 ** 0.5)
    single = quality.paired_differences(results[:1] + results[3:4], "limoe", "dense", "zeroshot/category/top1")
    assert single["n"] == 1 and single["ci95"] is None
    assert quality.paired_differences(results, "limoe-e8", "dense", "zeroshot/category/top1") is None


def test_confidence_interval_narrows_with_seeds_and_shows_in_the_table():
    assert quality.ci95_halfwidth(1.0, 3) == pytest.approx(4.303 / 3 ** 0.5)
    assert quality.ci95_halfwidth(1.0, 7) < quality.ci95_halfwidth(1.0, 3)
    assert quality.ci95_halfwidth(1.0, 100) == pytest.approx(1.96 / 10)
    assert quality.ci95_halfwidth(None, 1) is None
    row = {"claim": "c", "first": "a", "second": "b", "metric": "zeroshot/name/top1", "mean": 0.01,
           "std": 0.01, "ci95": 0.02, "min": 0.0, "max": 0.02, "n": 3, "first_higher": 2}
    table = quality.contrast_table([row])
    assert "| -1.0 pt … +3.0 pt |" in table and "95 % CI" in table


def test_contrasts_cover_the_variants_that_ran():
    results = []
    for seed in (0, 1):
        results += [make_result("dense", seed, 0.1), make_result("limoe", seed, 0.2, text_busiest=0.4),
                    make_result("limoe-no-aux", seed, 0.15, text_busiest=0.95, text_drop=0.5),
                    make_result("limoe-no-bpr", seed, 0.18, text_busiest=0.4)]
    rows = quality.contrasts(results)
    pairs = {(r["first"], r["second"], r["metric"]): r for r in rows}
    assert pairs[("limoe", "dense", "zeroshot/name/top1")]["mean"] == pytest.approx(0.1)
    collapse = pairs[("limoe-no-aux", "limoe", "routing/text/busiest_expert_share")]
    assert collapse["mean"] == pytest.approx(0.55) and collapse["first_higher"] == 2
    assert ("limoe-no-bpr", "limoe", "routing/text/drop_rate") in pairs
    assert not any(r["first"] == "limoe-e8" for r in rows)  # limoe-e8 did not run


def test_tables_mark_dense_routing_not_applicable_and_show_spread():
    results = [make_result("dense", 0, 0.05), make_result("limoe", 0, 0.1, text_busiest=0.5),
               make_result("limoe", 1, 0.3, text_busiest=0.7)]
    summary = quality.aggregate(results)
    routing = quality.routing_table(summary).splitlines()
    dense_row = next(line for line in routing if line.startswith("| dense |"))
    assert dense_row.count("n/a") == 8
    limoe_row = next(line for line in routing if line.startswith("| limoe |"))
    assert "60.0 ± 14.1" in limoe_row  # text busiest expert share, percent
    zeroshot = quality.zeroshot_table(summary, results)
    assert "| limoe | 2 | 20.0 ± 14.1 |" in zeroshot and "| chance |" in zeroshot


def test_mixed_settings_are_refused():
    results = [make_result("limoe", 0, 0.1), make_result("limoe", 1, 0.1, settings={**SETTINGS, "steps": 50})]
    with pytest.raises(SystemExit, match="other settings"):
        quality.check_settings(results)


def test_results_in_another_data_folder_still_aggregate():
    results = [make_result("limoe", 0, 0.1), make_result("limoe", 1, 0.1, settings={**SETTINGS, "data": "/moved"})]
    assert quality.check_settings(results)["steps"] == 200


def test_training_summary_averages_the_last_tenth_of_the_steps(tmp_path):
    rows = [{"step": i, "loss": float(i), "contrastive_loss": float(i), "aux_loss": 0.0, "samples_per_s": 100.0}
            for i in range(1, 21)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = quality.training_summary(path)
    assert summary["tail_steps"] == 2 and summary["contrastive_loss"] == pytest.approx(19.5)
    assert summary["samples_per_s"] == 100.0


def test_a_finished_training_is_reused_and_an_interrupted_one_moved_aside(tmp_path):
    finished = tmp_path / "limoe-seed0"
    (finished / "export").mkdir(parents=True)
    (finished / "export" / "config.json").write_text("{}")
    assert quality.prepare_run_dir(finished, resume=False)

    interrupted = tmp_path / "limoe-seed1"
    interrupted.mkdir()
    (interrupted / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match="--resume"):
        quality.prepare_run_dir(interrupted, resume=False)
    assert not quality.prepare_run_dir(interrupted, resume=True)
    assert not interrupted.exists()
    (aside,) = tmp_path.glob("limoe-seed1.interrupted-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'  # kept, not deleted


def test_report_section_is_replaced_between_markers_and_the_rest_kept(tmp_path):
    doc = tmp_path / "quality.md"
    doc.write_text(f"# Quality\n\nhow to run\n\n{quality.GENERATED_START}\nold numbers\n{quality.GENERATED_END}\n\n"
                   "## Conclusions\n\nthe lead's words\n")
    quality.update_report(doc, f"{quality.GENERATED_START}\nnew numbers\n{quality.GENERATED_END}")
    text = doc.read_text()
    assert "new numbers" in text and "old numbers" not in text
    assert text.count(quality.GENERATED_START) == text.count(quality.GENERATED_END) == 1
    assert text.startswith("# Quality\n\nhow to run") and text.endswith("the lead's words\n")


def test_report_section_is_added_to_a_new_file_and_a_lone_marker_refused(tmp_path):
    doc = tmp_path / "new.md"
    quality.update_report(doc, f"{quality.GENERATED_START}\nnumbers\n{quality.GENERATED_END}")
    assert doc.read_text().count(quality.GENERATED_START) == 1
    broken = tmp_path / "broken.md"
    broken.write_text(f"text\n{quality.GENERATED_START}\n")
    with pytest.raises(SystemExit, match="only one of the markers"):
        quality.update_report(broken, "x")
    assert broken.read_text() == f"text\n{quality.GENERATED_START}\n"


def test_report_only_renders_tables_plot_and_doc_from_results_files(tmp_path):
    out = tmp_path / "out"
    for seed in (0, 1):
        for r in (make_result("dense", seed, 0.1), make_result("limoe", seed, 0.2 + seed / 10, text_busiest=0.4)):
            quality.write_json(quality.result_path(out, r["variant"], seed), r)
    report = tmp_path / "docs" / "quality.md"
    assert quality.main(["--report-only", "--out", str(out), "--report", str(report)]) == 0
    text = report.read_text()
    assert "python benchmarks/quality.py --report-only" in text and "2 CPU cores" in text
    assert "total run time: 8.0 min" in text  # 4 runs x 120 s
    assert "![quality ablation](quality.png)" in text
    assert (report.parent / "quality.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"]["limoe"]["metrics"]["zeroshot/name/top1"]["mean"] == pytest.approx(0.25)
    assert summary["runs"] == ["dense-seed0", "dense-seed1", "limoe-seed0", "limoe-seed1"]


def test_a_named_section_is_written_beside_the_main_one_with_its_own_plot(tmp_path):
    out = tmp_path / "round5"
    for seed in (0, 1):
        r = make_result("limoe", seed, 0.3)
        quality.write_json(quality.result_path(out, "limoe", seed), r)
    report = tmp_path / "quality.md"
    report.write_text(f"intro\n{quality.GENERATED_START}\nmain numbers\n{quality.GENERATED_END}\nprose\n")
    assert quality.main(["--report-only", "--out", str(out), "--report", str(report), "--section", "round5"]) == 0
    text = report.read_text()
    start, end = quality.markers("round5")
    assert text.startswith(f"intro\n{quality.GENERATED_START}\nmain numbers\n{quality.GENERATED_END}\nprose\n")
    assert text.count(start) == text.count(end) == 1 and text.index(start) < text.index(end)
    assert "![quality ablation](quality-round5.png)" in text and (tmp_path / "quality-round5.png").is_file()
    assert not (tmp_path / "quality.png").exists()  # the main section's plot is not overwritten
    report.write_text(text.replace("prose\n", "prose\n\nmore prose\n"))  # rerendering keeps what is around it
    assert quality.main(["--report-only", "--out", str(out), "--report", str(report), "--section", "round5"]) == 0
    again = report.read_text()
    assert again.count(start) == 1 and "more prose" in again and "main numbers" in again


def test_report_only_can_render_some_variants_and_seeds_into_their_own_section(tmp_path):
    out = tmp_path / "round"
    for seed in (0, 1, 2, 3):
        for variant, top1 in (("limoe", 0.2 + seed / 100), ("dense", 0.1), ("open_clip", 0.5)):
            quality.write_json(quality.result_path(out, variant, seed), make_result(variant, seed, top1))
    report = tmp_path / "quality.md"
    assert quality.main(["--report-only", "--out", str(out), "--report", str(report)]) == 0
    assert quality.main(["--report-only", "--out", str(out), "--report", str(report), "--section", "targets",
                         "--seeds", "0", "1", "2", "--variants", "limoe", "dense"]) == 0
    everything = json.loads((out / "summary.json").read_text())
    some = json.loads((out / "summary-targets.json").read_text())
    assert len(everything["runs"]) == 12 and set(everything["variants"]) == {"limoe", "dense", "open_clip"}
    assert some["runs"] == [f"{v}-seed{s}" for v in ("dense", "limoe") for s in (0, 1, 2)]
    assert some["variants"]["limoe"]["metrics"]["zeroshot/name/top1"]["mean"] == pytest.approx(0.21)
    assert everything["variants"]["limoe"]["metrics"]["zeroshot/name/top1"]["mean"] == pytest.approx(0.215)
    start, end = quality.markers("targets")
    section = report.read_text().split(start)[1].split(end)[0]
    assert "| open_clip |" not in section and "| limoe |" in section and "--seeds 0 1 2" in section
