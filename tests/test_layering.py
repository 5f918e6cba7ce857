"""The model (limoe/), evaluation and serving run without DeepSpeed; launch/ makes the
same MoE modules DeepSpeed's for training, under the checkpoint format's names."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from deepspeed.moe.layer import MoE

from conftest import make_tiny_model
from launch.expert_parallel import apply_expert_parallel
from limoe.config import MoEConfig
from limoe.layers import MLP
from limoe.moe import LIMoELayer
from test_eval_zeroshot import emoji_layout  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]


def run_python(script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter on this checkout (the working directory comes first on sys.path)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


MOE_BLOCK_KEYS = ["blocks.1.mlp.deepspeed_moe.gate.wg.weight"] + [
    f"blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.{i}.{name}"
    for i in range(4) for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]


def test_moe_parameters_keep_the_names_of_exports_and_engine_checkpoints(tiny_tokenizer):
    keys = [k for k in make_tiny_model(tiny_tokenizer).state_dict() if k.startswith("blocks.1.mlp.")]
    assert keys == MOE_BLOCK_KEYS


def test_the_deepspeed_model_is_the_plain_model_with_the_same_names_and_parameters(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer).eval()
    images, tokens = torch.randn(2, 3, 16, 16), tiny_tokenizer(["red heart", "a cat"])
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(tokens)
    state = model.state_dict(keep_vars=True)
    assert apply_expert_parallel(model) is model
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state)
    assert all(after[k] is state[k] for k in state)  # the very same parameter objects
    layers = model.moe_layers()
    assert layers and all(isinstance(layer, MoE) and isinstance(layer, LIMoELayer) for layer in layers)
    for name, param in model.named_parameters():  # what DeepSpeed's engine and optimizer groups read
        if ".deepspeed_experts." in name:
            assert param.allreduce is False and param.group_name == "ep_size_1", name
        else:
            assert not hasattr(param, "allreduce"), name
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), before[0])
        assert torch.equal(model.encode_text(tokens), before[1])


def test_a_layer_with_a_share_of_the_experts_needs_its_expert_parallel_group():
    layer = LIMoELayer(8, MLP(8, 16), MoEConfig(num_experts=4), ep_size=2)
    assert len(layer.experts.deepspeed_experts) == 2
    with pytest.raises(RuntimeError, match="holds 2 of 4 experts .*expert-parallel group"):
        layer(torch.randn(5, 8), torch.zeros(5, dtype=torch.long))


def test_importing_the_model_evaluation_serving_and_the_command_line_imports_no_deepspeed():
    proc = run_python("""
        import sys
        import eval.cli, limoe, limoe.serve.app, launch.cli
        launch.cli.build_parser()  # imports every subcommand's module
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed")
        assert not loaded, loaded
        print(limoe.__file__)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(REPO / "limoe" / "__init__.py")


def test_load_embedder_eval_and_serve_run_with_deepspeed_absent(tiny_export, emoji_layout, tmp_path):  # noqa: F811
    result = tmp_path / "zeroshot.json"
    proc = run_python(f"""
        import sys
        sys.modules["deepspeed"] = None  # any `import deepspeed` now raises ImportError

        import httpx
        import torch

        import limoe
        from launch.cli import main
        from limoe.serve import BackgroundServer, ServeSettings, create_app

        model, preprocess, tokenizer = limoe.load({str(tiny_export)!r})
        with torch.no_grad():
            assert model.encode_text(tokenizer(["red heart"])).shape == (1, 16)
        embedder = limoe.Embedder({str(tiny_export)!r})
        assert embedder.embed_texts(["red heart"]).shape == (1, 16)
        assert main(["eval", "zeroshot", "--model", {str(tiny_export)!r}, "--data", {str(emoji_layout)!r},
                     "--templates", "simple", "--batch-size", "4", "--output", {str(result)!r}]) == 0
        with BackgroundServer(create_app(embedder, ServeSettings(torch_threads=1))) as server:
            response = httpx.post(server.url + "/v1/embeddings", json={{"input": ["red heart"]}}, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["embedding"]) == 16
    """)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert result.is_file()
