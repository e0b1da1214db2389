"""The command line on a tiny model: generate prints text, bench writes a JSON result, bad input exits 2."""
import json

import pytest

from ccserve.cli import main
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("cli") / "llama", "llama")


def test_generate_prints_text(model_dir, capsys):
    main(["generate", "--model", str(model_dir), "--max-model-len", "128", "--num-gpu-blocks", "32",
          "--max-tokens", "5", "--chat", "Hello there"])
    assert capsys.readouterr().out.strip()


def test_bench_writes_result_with_machine_commit_settings(model_dir, tmp_path):
    main(["bench", "--model", str(model_dir), "--workloads", "C-decode", "--max-model-len", "160",
          "--num-gpu-blocks", "1024", "--out", str(tmp_path)])
    (result_file,) = tmp_path.glob("throughput-*.json")
    result = json.loads(result_file.read_text())
    assert {"machine", "commit", "settings", "results"} <= result.keys()
    assert result["kv_capacity_tokens"] == 1024 * 16 and result["kv_format_compression"] == 1.0
    run = result["results"]["C-decode"]
    assert run["out_tok"] == 64 * 32 and run["output_tok_s"] > 0  # 160 - 128 prompt tokens each


def test_bad_setting_exits_with_a_sentence(model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(model_dir), "--block-size", "7", "hi"])
    assert exc.value.code == 2
    assert "block_size" in capsys.readouterr().err


def test_lora_flag_takes_name_dir_pairs(model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(model_dir), "--lora", "tuned", "hi"])
    assert exc.value.code == 2 and "NAME=DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:     # parsed into lora_adapters, then refused: not an adapter directory
        main(["generate", "--model", str(model_dir), "--max-model-len", "64", "--lora", f"tuned={model_dir}",
              "--max-loras", "2", "hi"])
    assert exc.value.code == 2
    assert "LoRA adapter 'tuned'" in capsys.readouterr().err


def test_tensor_parallel_flag_reaches_the_engine_checks(model_dir, capsys):
    with pytest.raises(SystemExit) as exc:     # the tiny llama has 4 heads: refused before any worker starts
        main(["generate", "--model", str(model_dir), "--tensor-parallel-size", "3", "hi"])
    assert exc.value.code == 2
    assert "tensor_parallel_size 3 does not divide the attention heads" in capsys.readouterr().err


def test_public_prefix_file_is_measured(model_dir, tmp_path, capsys):
    """The release's measured configuration holds the prefix file's content: edit the file, the measurement moves."""
    prefixes = tmp_path / "system.txt"
    digests = []
    for text in ("You are a helpful assistant.", "You are a helpful assistant!"):
        prefixes.write_text(text)
        main(["release", "--model", str(model_dir), "--public-prefix-file", str(prefixes), "--dry-run"])
        digests.append(json.loads(capsys.readouterr().out)["config"])
    listed = tmp_path / "prefixes.json"
    listed.write_text(json.dumps(["You are a helpful assistant!"]))
    main(["release", "--model", str(model_dir), "--public-prefix-file", str(listed), "--dry-run"])
    digests.append(json.loads(capsys.readouterr().out)["config"])
    assert digests[0] != digests[1] == digests[2]


def test_prefix_caching_flags_are_refused_or_checked(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(model_dir), "--enable-prefix-caching", "hi"])
    assert exc.value.code == 2 and "stateless computation (S)" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"system": "not a list"}')
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(model_dir), "--public-prefix-file", str(bad), "hi"])
    assert exc.value.code == 2 and "must hold a list" in capsys.readouterr().err
