"""The demo runner end to end on a tiny model (the real `make demo` uses the shipped weights)."""

import pytest

from test_online_rl import tiny_model


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_its_last_line(tmp_path):
    from diffalign.runtime.demo import run_demo

    tiny_model("flow").save_pretrained(tmp_path / "model")
    config = tmp_path / "demo.yaml"
    config.write_text(f"model: {tmp_path / 'model'}\nmethod: flow_grpo\nreward: shapes\nepochs: 2\n"
                      "algorithm:\n  group_size: 4\n  batch_size: 8\n  num_steps: 3\n  beta: 0.0\n")
    lines = []
    result = run_demo(config, tmp_path / "run", eval_prompts=4, seeds_per_prompt=2, echo=lines.append)
    assert lines[-1].startswith("demo: held-out accuracy ") and " -> " in lines[-1] and "diversity" in lines[-1]
    base = result["models"]["base"]["shapes"]["accuracy"]["overall"]
    assert f"{base:.3f} ->" in lines[-1]
    for f in ["final/config.json", "final/model.safetensors", "eval/eval.json", "report.html", "metrics.jsonl"]:
        assert (tmp_path / "run" / f).is_file(), f


def test_demo_refuses_a_missing_config(tmp_path):
    from diffalign.runtime.demo import run_demo

    with pytest.raises(FileNotFoundError, match="demo config not found"):
        run_demo(tmp_path / "nope.yaml", tmp_path / "run")
