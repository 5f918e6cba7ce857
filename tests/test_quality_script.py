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

SETTINGS = {"config": "cpu-demo", "steps": 200, "batch_size": 64, "num_procs": 1, "vocab_size": 1000,
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


def test_every_variant_is_a_valid_cpu_demo_config_with_the_intended_routing():
    models = {}
    for variant in quality.VARIANTS:
        overrides = quality.run_overrides(variant, 3, SETTINGS) + [("name", f"check-{variant}")]
        config = load_config("cpu-demo", overrides)
        assert config.seed == 3 and config.train.batch_size == 64 and config.parallel.ep_size == 1
        models[variant] = config.model_config().moe
    assert models["dense"].num_experts == 0
    assert models["e4"].num_experts == 4 and models["e8"].num_experts == 8
    assert models["e4"].text.local_entropy > 0 and models["e4"].text.global_entropy > 0
    no_entropy = models["e4-no-entropy"]
    assert no_entropy.text.importance > 0 and no_entropy.text.load > 0
    assert no_entropy.text.local_entropy == no_entropy.text.global_entropy == no_entropy.image.local_entropy == 0
    no_aux = models["e4-no-aux"]
    assert all(getattr(w, name) == 0 for w in (no_aux.image, no_aux.text)
               for name in ("importance", "load", "local_entropy", "global_entropy", "zloss"))
    assert models["e4"].batch_priority_routing and not models["e4-no-bpr"].batch_priority_routing
    assert models["e4"].capacity_factor == models["e4-no-bpr"].capacity_factor == 1.0


def test_the_global_batch_is_split_over_processes():
    overrides = dict(quality.run_overrides("e4", 0, {**SETTINGS, "num_procs": 2}))
    assert overrides["train.batch_size"] == 32 and overrides["parallel.num_procs"] == 2


def test_aggregate_gives_mean_sample_std_min_max_over_seeds_per_variant():
    results = [make_result("e4", s, t, text_busiest=0.4) for s, t in ((0, 0.10), (1, 0.20), (2, 0.30))]
    results.append(make_result("dense", 0, 0.05))
    summary = quality.aggregate(results)
    assert list(summary) == ["dense", "e4"]  # VARIANTS order, whatever the file order
    top1 = summary["e4"]["metrics"]["zeroshot/category/top1"]
    assert top1["mean"] == pytest.approx(0.20) and top1["std"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.3]))
    assert (top1["min"], top1["max"], top1["n"]) == (0.10, 0.30, 3)
    assert summary["e4"]["seeds"] == [0, 1, 2]
    assert summary["dense"]["metrics"]["zeroshot/name/top1"]["std"] is None  # one seed: no spread
    assert "routing/text/busiest_expert_share" not in summary["dense"]["metrics"]


def test_paired_differences_match_seeds_and_skip_unpaired_ones():
    results = [make_result("e4", 0, 0.30), make_result("e4", 1, 0.25), make_result("e4", 2, 0.90),
               make_result("dense", 0, 0.20), make_result("dense", 1, 0.30)]
    d = quality.paired_differences(results, "e4", "dense", "zeroshot/category/top1")
    assert d["seeds"] == [0, 1]
    assert d["mean"] == pytest.approx(((0.30 - 0.20) + (0.25 - 0.30)) / 2)
    assert d["first_higher"] == 1 and d["n"] == 2
    assert quality.paired_differences(results, "e8", "dense", "zeroshot/category/top1") is None


def test_contrasts_cover_the_three_claims_when_their_variants_ran():
    results = []
    for seed in (0, 1):
        results += [make_result("dense", seed, 0.1), make_result("e4", seed, 0.2, text_busiest=0.4),
                    make_result("e4-no-entropy", seed, 0.15, text_busiest=0.95, text_drop=0.5),
                    make_result("e4-no-bpr", seed, 0.18, text_busiest=0.4)]
    rows = quality.contrasts(results)
    pairs = {(r["first"], r["second"], r["metric"]): r for r in rows}
    assert pairs[("e4", "dense", "zeroshot/name/top1")]["mean"] == pytest.approx(0.1)
    collapse = pairs[("e4-no-entropy", "e4", "routing/text/busiest_expert_share")]
    assert collapse["mean"] == pytest.approx(0.55) and collapse["first_higher"] == 2
    assert ("e4-no-bpr", "e4", "routing/text/drop_rate") in pairs
    assert not any(r["first"] == "e8" for r in rows)  # e8 did not run


def test_tables_mark_dense_routing_not_applicable_and_show_spread():
    results = [make_result("dense", 0, 0.05), make_result("e4", 0, 0.1, text_busiest=0.5),
               make_result("e4", 1, 0.3, text_busiest=0.7)]
    summary = quality.aggregate(results)
    routing = quality.routing_table(summary).splitlines()
    dense_row = next(line for line in routing if line.startswith("| dense |"))
    assert dense_row.count("n/a") == 8
    e4_row = next(line for line in routing if line.startswith("| e4 |"))
    assert "60.0 ± 14.1" in e4_row  # text busiest expert share, percent
    zeroshot = quality.zeroshot_table(summary, results)
    assert "| e4 | 2 | 20.0 ± 14.1 |" in zeroshot and "| chance |" in zeroshot


def test_mixed_settings_are_refused():
    results = [make_result("e4", 0, 0.1), make_result("e4", 1, 0.1, settings={**SETTINGS, "steps": 50})]
    with pytest.raises(SystemExit, match="other settings"):
        quality.check_settings(results)


def test_results_in_another_data_folder_still_aggregate():
    results = [make_result("e4", 0, 0.1), make_result("e4", 1, 0.1, settings={**SETTINGS, "data": "/moved"})]
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
    finished = tmp_path / "e4-seed0"
    (finished / "export").mkdir(parents=True)
    (finished / "export" / "config.json").write_text("{}")
    assert quality.prepare_run_dir(finished, resume=False)

    interrupted = tmp_path / "e4-seed1"
    interrupted.mkdir()
    (interrupted / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match="--resume"):
        quality.prepare_run_dir(interrupted, resume=False)
    assert not quality.prepare_run_dir(interrupted, resume=True)
    assert not interrupted.exists()
    (aside,) = tmp_path.glob("e4-seed1.interrupted-*")
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
        for r in (make_result("dense", seed, 0.1), make_result("e4", seed, 0.2 + seed / 10, text_busiest=0.4)):
            quality.write_json(quality.result_path(out, r["variant"], seed), r)
    report = tmp_path / "docs" / "quality.md"
    assert quality.main(["--report-only", "--out", str(out), "--report", str(report)]) == 0
    text = report.read_text()
    assert "python benchmarks/quality.py --report-only" in text and "2 CPU cores" in text
    assert "total run time: 8.0 min" in text  # 4 runs x 120 s
    assert "![quality ablation](quality.png)" in text
    assert (report.parent / "quality.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"]["e4"]["metrics"]["zeroshot/name/top1"]["mean"] == pytest.approx(0.25)
    assert summary["runs"] == ["dense-seed0", "dense-seed1", "e4-seed0", "e4-seed1"]
