"""The experiment commands end to end: the digits job, exact resume, the CIFAR-10 command on a tiny
generated data set, the comparison table, and the errors users see."""

import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch

import pinet
from experiments import compare, train
from experiments.cifar10 import cifar10mlp
from experiments.common import build_model, build_optimizer, evaluate, load_digits_data, make_loss


# Small tensors: one thread (tests/conftest.py) avoids OpenMP oversubscription on shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")


# Small but real: 500 training digits, r = 32, two epochs reach ~85% test accuracy (chance: 10%).
FAST = "--train-subset 500 --test-subset 200 --r 32 --batch-size 16 --epochs 2 --no-progress".split()


def _log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_main_job_writes_log_checkpoint_plot(tmp_path):
    out = tmp_path / "run"
    train.main(FAST + ["--save-dir", str(out), "--save-model"])
    rows = _log(out / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    final = float(rows[-1]["test_acc"])
    assert final > 0.6, f"test accuracy {final} should beat chance (0.1) by a wide margin"
    # M grows by the number of training examples per epoch in every π-layer.
    assert int(rows[-1]["M_layer1"]) == int(rows[0]["M_layer1"]) + 500 == 32 + 1000

    # The checkpoint and model file load back into a net that reproduces the logged test accuracy.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    data = load_digits_data(train_subset=500, test_subset=200)
    for sd in (ckpt["model"], torch.load(out / "model.pt", weights_only=True)):
        net = pinet.InfPiMLP.from_state_dict(sd)
        assert net.layers[1].state.rows == 1032
        res = evaluate(net, data.test_batches(1000), make_loss("xent", 10))
        assert res["acc"] == pytest.approx(final, abs=1e-12)

    from PIL import Image

    with Image.open(out / "curves.png") as im:
        im.verify()
        assert im.size[0] > 300 and im.size[1] > 100


@pytest.mark.parametrize("width", [0, 48])
def test_resume_is_bit_exact(tmp_path, width):
    # Everything with state: momentum buffers (growing with M), weight decay, per-parameter
    # clipping, accumulation with a stash pending across the epoch boundary (13 batches, 2 per
    # update), a scheduler, the shuffling generator. float64 so any difference would show.
    args = ("--train-subset 200 --test-subset 100 --r 16 --batch-size 16 --epochs 3 --float64 --momentum 0.9 "
            "--wd 1e-3 --accum-steps 2 --scheduler cosine --lr 0.5 --no-progress").split()
    args += ["--width", str(width)]
    train.main(args + ["--save-dir", str(tmp_path / "straight")])
    train.main(args + ["--save-dir", str(tmp_path / "stopped"), "--stop-after", "2"])
    assert len(_log(tmp_path / "stopped" / "log.csv")) == 2
    train.main(["--resume", str(tmp_path / "stopped" / "checkpoint.pt"), "--no-progress"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    keys = ["train_loss", "train_acc", "test_loss", "test_acc", "lr", "grad_norm", "rows"]
    assert len(a["history"]) == 3
    assert [[r[k] for k in keys] for r in a["history"]] == [[r[k] for k in keys] for r in b["history"]]
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["model"][k]), k
    timing = ("epoch_time", "elapsed")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_log(tmp_path / "stopped" / "log.csv")) == strip(_log(tmp_path / "straight" / "log.csv"))


def test_width_samples_the_same_initialisation(tmp_path):
    args = train.build_parser().parse_args(["--r", "8", "--seed", "3", "--width", "64"])
    fin = build_model(args, 64, 10, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    inf = pinet.InfPiMLP(64, 10, 8, 1, first_layer_alpha=args.first_layer_alpha,
                         last_layer_alpha=args.last_layer_alpha, bias_alpha=args.bias_alpha)  # fmt: skip
    inf.reset_parameters(gen)
    expected = inf.sample(64, generator=gen)
    for k, v in expected.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fin.state_dict()[k]), k
    # and the finite job runs and is logged like the infinite one
    train.main(FAST + ["--width", "64", "--epochs", "1", "--save-dir", str(tmp_path)])
    assert "M_layer1" not in _log(tmp_path / "log.csv")[0]


@pytest.mark.parametrize(
    "argv, flag",
    [
        ("--lr -1", "--lr"),
        ("--r 0", "--r"),
        ("--depth -1", "--depth"),
        ("--lr abc", "--lr"),
        ("--width 16 --r 32", "--width"),
        ("--scheduler multistep", "--scheduler"),
        ("--lr-drop-milestones a,b --scheduler multistep", "--lr-drop-milestones"),
        ("--nesterov", "--nesterov"),
        ("--test", "--test"),
        ("--resume /nonexistent/checkpoint.pt", "--resume"),
        ("--float --float64", "--float64"),
        ("--no-such-flag", "--no-such-flag"),
        ("--momentum 1.0", "--momentum: must be in [0, 1)"),
        ("--momentum 1.5", "--momentum: must be in [0, 1)"),
        ("--epochs 0", "--epochs: must be >= 1"),
        ("--seed -1", "--seed: must be an int in [0, 2**63 - 8)"),
        ("--seed 18446744073709551615", "--seed"),
        ("--split-seed -1", "--split-seed must be an int in [0, 2**32)"),
        ("--test-size 0.001", "--test-size must leave at least 10 examples"),
        ("--test-size 0.999", "--test-size must leave at least 10 examples"),
        ("--accum-steps 50 --train-subset 64 --epochs 6", "--accum-steps 50 exceeds the 12 batches of the whole run"),
    ],
)
def test_bad_flags_are_clear_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        train.main(argv.split())
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_resume_refuses_conflicting_flags(tmp_path, capsys):
    train.main(FAST + ["--epochs", "1", "--save-dir", str(tmp_path), "--train-subset", "64"])
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "checkpoint.pt"), "--lr", "0.3", "--epochs", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--lr 0.3 conflicts with the checkpoint" in err and len(err.strip().splitlines()) == 1


def test_refused_resume_leaves_no_empty_save_dir(tmp_path, capsys):
    # The new --save-dir is created only once the checkpoint has been restored.
    train.main(FAST + ["--epochs", "1", "--save-dir", str(tmp_path / "a"), "--train-subset", "64"])
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    del ckpt["rng"]
    torch.save(ckpt, tmp_path / "damaged.pt")
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(tmp_path / "damaged.pt"), "--epochs", "2", "--save-dir", str(tmp_path / "new")])
    assert e.value.code == 2 and "rng" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


TINY = "--train-subset 64 --test-subset 32 --r 8 --batch-size 16 --epochs 1 --no-progress".split()


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_with_an_explicit_empty_save_dir_writes_nothing(tmp_path, monkeypatch, capsys):
    # --save-dir "" used to count as "not given" (it is the parser's "empty" value) and the resumed
    # run then replaced the files of the run it resumed from, its checkpoint included.
    run = tmp_path / "run1"
    train.main(TINY + ["--save-dir", str(run)])
    before = _files(run)
    monkeypatch.chdir(tmp_path)  # a relative output/train would show up here
    capsys.readouterr()
    train.main(["--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--save-dir", "", "--no-progress"])
    out = capsys.readouterr().out
    assert any(line.split()[:1] == ["2"] for line in out.splitlines()), out  # epoch 2 was trained
    assert "wrote" not in out
    assert _files(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1"]


def test_resume_honours_an_explicit_save_dir_equal_to_the_default(tmp_path, monkeypatch):
    run = tmp_path / "run1"
    train.main(TINY + ["--save-dir", str(run)])
    before = _files(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    default = train.build_parser().get_default("save_dir")
    assert default  # the case this test is about: a non-empty default typed out
    train.main(["--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--save-dir", default, "--no-progress"])
    assert [int(r["epoch"]) for r in _log(elsewhere / default / "log.csv")] == [1, 2]
    assert _files(run) == before


def test_resume_refuses_an_explicit_flag_equal_to_its_default(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run1"
    default_lr = train.build_parser().get_default("lr")
    train.main(TINY + ["--save-dir", str(run), "--lr", str(default_lr / 2)])
    before = _files(run)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--lr", str(default_lr)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--lr {default_lr} conflicts with the checkpoint (--lr {default_lr / 2}); a resumed run "
                        "keeps its training flags (only --epochs, --save-dir and output flags may change)"), err
    assert len(err.splitlines()) == 1
    assert _files(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run1"]


def test_given_dests_sees_typed_flags_whatever_their_value():
    from experiments.common import given_dests
    from experiments.imagenet import transfer_imagenet

    for parser in (train.build_parser(), transfer_imagenet.build_parser()):  # the latter: set_defaults(seed=1)
        defaults = vars(parser.parse_args([]))
        d = parser.get_default
        argv = ["--lr", str(d("lr")), "--pi-rank", "8", "--save-dir", "", "--float64", "--no-apply-lr-mult-to-wd"]
        assert given_dests(parser, argv) == {"lr", "r", "save_dir", "float64", "apply_lr_mult_to_wd"}
        assert given_dests(parser, []) == set()
        assert vars(parser.parse_args([])) == defaults  # the parser's defaults are restored


def test_transfer_resume_merge_counts_typed_flags(tmp_path):
    # experiments.imagenet.transfer_imagenet merges its resumed flags the same way (without data here).
    from experiments.common import CLIError, given_dests
    from experiments.imagenet import transfer_imagenet

    parser = transfer_imagenet.build_parser()
    saved = vars(parser.parse_args(["--lr", "0.5"])) | {"width": 0}  # as _check saves an infinite net
    ckpt = str(tmp_path / "run" / "checkpoint.pt")

    def merge(*argv):
        argv = ["--resume", ckpt, *argv]
        return transfer_imagenet._merge_resume(parser, parser.parse_args(argv), saved, given_dests(parser, argv))

    assert merge().save_dir == str(tmp_path / "run") and merge().width is None and merge().lr == 0.5
    assert merge("--save-dir", "").save_dir == ""
    assert merge("--epochs", str(parser.get_default("epochs"))).epochs == parser.get_default("epochs")
    with pytest.raises(CLIError, match=r"--lr 2.0 conflicts with the checkpoint \(--lr 0.5\)"):
        merge("--lr", str(parser.get_default("lr")))
    with pytest.raises(CLIError, match=r"--width 16 conflicts with the checkpoint \(--width 0\)"):
        merge("--width", "16")


META = ["x", "--dataset", "digits", "--first-order", "--adapt-readout-only", "--num-epochs", "1", "--num-batches",
        "1", "--num-test-batches", "1", "--batch-size", "2", "--infnet-r", "4", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    "bad, msg",
    [
        (["--first-layer-lr-mult", "-1"], "--first-layer-lr-mult must be a finite number >= 0, got -1.0"),
        (["--last-layer-lr-mult", "-0.5"], "--last-layer-lr-mult must be a finite number >= 0, got -0.5"),
        (["--bias-lr-mult", "-1"], "--bias-lr-mult must be a finite number >= 0, got -1.0"),
        (["--bias-lr-mult", "nan"], "--bias-lr-mult must be finite, got nan"),
        (["--grad-clip", "inf"], "--grad-clip must be finite, got inf"),
        (["--lr-drop-ratio", "-1", "--scheduler", "exp"], "--lr-drop-ratio must be a finite number >= 0, got -1.0"),
        (["--varw", "-1", "--gp"], "--varw must be a finite number >= 0, got -1.0"),
        (["--varb", "-1", "--ntk"], "--varb must be a finite number >= 0, got -1.0"),
        (["--sigma1", "nan", "--gp1lp"], "--sigma1 must be finite, got nan"),
        (["--sigmab", "inf", "--ntk1lp"], "--sigmab must be finite, got inf"),
    ],
)
def test_meta_train_bad_multipliers_clip_and_kernel_flags_are_one_line_errors(tmp_path, capsys, bad, msg):
    # The lr multipliers, --varw/--varb and the kernel flags' NaNs were tracebacks (exit 1) from
    # pinet.optim.param_groups or the kernels (--grad-clip <= 0 is the reference's "no clipping").
    from experiments.meta import train as meta_train

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        meta_train.main(META + ["--output-folder", str(out), *bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m experiments.meta.train: error: {msg}", err
    assert not out.exists()


def test_meta_train_grad_clip_off_is_the_reference_default_and_clips_nothing(tmp_path):
    from experiments.meta import train as meta_train

    assert meta_train.build_parser().get_default("grad_clip") == -1.0  # the reference's default: off
    for off in ("0", "-1"):
        args = meta_train.build_parser().parse_args(META + ["--grad-clip", off])
        model = meta_train.build_model(args, 64, torch.device("cpu"))
        opt, _ = meta_train.build_optimizer(args, model, 1)
        assert not any(isinstance(h, pinet.hooks.ClipGradNorm) for h in opt.hooks)
    args.grad_clip = 0.5
    opt, _ = meta_train.build_optimizer(args, model, 1)
    assert [h.max_norm for h in opt.hooks if isinstance(h, pinet.hooks.ClipGradNorm)] == [0.5]


def test_negative_lr_multipliers_and_clip_are_refused_by_every_training_cli(tmp_path, capsys):
    from experiments.imagenet import transfer_imagenet

    runs = [
        lambda *bad: train.main(TINY + ["--save-dir", str(tmp_path / "never"), *bad]),
        lambda *bad: cifar10mlp.main(["--data", str(tmp_path / "nodata"), "--save-dir", str(tmp_path / "never"), *bad]),
        lambda *bad: transfer_imagenet.main(["--imagenet-data", str(tmp_path / "nodata"),
                                             "--save-dir", str(tmp_path / "never"), *bad]),  # fmt: skip
        lambda *bad: compare.main(["--out", str(tmp_path / "never" / "c.md"), *bad]),
    ]
    for run in runs:
        for bad in (["--first-layer-lr-mult", "-1"], ["--last-layer-lr-mult", "-1"], ["--bias-lr-mult", "-1"],
                    ["--gclip", "-0.5"], ["--gclip", "nan"]):  # fmt: skip
            with pytest.raises(SystemExit) as e:
                run(*bad)
            assert e.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert f"argument {bad[0]}: must be a finite number >= 0" in err[-1] and not any("Traceback" in x for x in err)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------ CIFAR-10
REFERENCE = (  # the command of the reference README (seeds/000_*), minus --cuda
    "--lr 1.0 --gclip-per-param --gclip 0.4 --lr-drop-ratio 0.15 --lr-drop-milestones 40 "
    "--scheduler multistep --wd 0.00001 --r 400 --batch-size 8 --epochs 50 --width 0 --seed 0 --depth 2 "
    "--bias-alpha 0.5 --first-layer-lr-mult 0.1 --last-layer-lr-mult 4.0 --first-layer-alpha 1.0 "
    "--last-layer-alpha 0.5 --no-apply-lr-mult-to-wd --save-dir ./output/"
).split()


def _write_cifar10(root, per_batch=8, n_test=20):
    """Tiny CIFAR-10 in the real python-pickle layout (data_batch_1..5, test_batch, batches.meta)."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)

    def batch(n, label):
        y = rng.integers(0, 10, n)
        x = np.clip(y[:, None] * 25 + rng.integers(0, 40, (n, 3072)), 0, 255).astype(np.uint8)
        names = [f"{i}.png" for i in range(n)]
        return {"batch_label": label, "labels": y.tolist(), "data": x, "filenames": names}

    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(per_batch, f"training batch {i} of 5"), f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch(n_test, "testing batch 1 of 1"), f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar10(tmp_path / "data")
    # torchvision compares each file's md5 with the real CIFAR-10's; generated files cannot match,
    # so only that check is relaxed to "the file exists". Everything else is torchvision's loader.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path


def test_cifar10_reference_command_end_to_end(tiny_cifar, capsys):
    out, data = str(tiny_cifar / "out"), str(tiny_cifar / "data")
    # Later flags win in argparse: the reference command with one epoch, float32, our paths.
    overrides = ["--float", "--epochs", "1", "--save-model", "--data", data, "--save-dir", out]
    cifar10mlp.main(REFERENCE + overrides)
    rows = _log(os.path.join(out, "log.csv"))
    assert len(rows) == 1 and int(rows[0]["M_layer1"]) == 400 + 40
    assert "M_layer3" in rows[0]  # --depth 2: two hidden π-layers and the output π-layer
    cifar10mlp.main(["--test", "--model-path", os.path.join(out, "model.pt"), "--data", data, "--float"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("test: loss") and "/20)" in line


def test_cifar10_other_flags(tiny_cifar):
    out, data = tiny_cifar / "fin", str(tiny_cifar / "data")
    cifar10mlp.main(["--data", data, "--save-dir", str(out)] + (
        "--width 16 --r 8 --epochs 1 --float --data-augment --loss mse --accum-steps 2 --momentum 0.9 "
        "--nesterov --scheduler cosine --layernorm --test-batch-size 7 --human").split())  # fmt: skip
    assert len(_log(out / "log.csv")) == 1
    # Without --float the π-rows are stored in float16 (the reference default), computed in float32.
    half = str(out / "half")
    cifar10mlp.main(["--data", data, "--save-dir", half, "--save-model", "--r", "8", "--epochs", "1",
                     "--gclip", "0.4", "--gclip-per-param"])  # fmt: skip
    assert torch.load(out / "half" / "model.pt", weights_only=True)["layers.1.state.A"].dtype == torch.float16


def test_cifar10_half_rows_that_overflow_are_a_one_line_error(tiny_cifar, capsys):
    # lr 1 without clipping diverges on this data: by step 5 the π-rows pass float16's 65504. They
    # used to be stored as inf (and the run went on in NaN); now the step is refused and reported.
    out = tiny_cifar / "half"
    with pytest.raises(SystemExit) as e:
        cifar10mlp.main(["--data", str(tiny_cifar / "data"), "--save-dir", str(out), "--r", "8", "--epochs", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "training diverged in epoch 1, step" in err and "beyond the range of the torch.float16 store" in err


def test_cifar10_missing_data_and_cuda_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cifar10mlp.main(["--data", str(tmp_path / "nowhere"), "--float"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "CIFAR-10 not found" in err and "--data" in err and "--download" in err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            cifar10mlp.main(["--cuda", "--data", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "CUDA is not available" in err


def test_cifar10_help_documents_depth(capsys):
    with pytest.raises(SystemExit) as e:
        cifar10mlp.main(["--help"])
    assert e.value.code == 0
    assert "number of HIDDEN π-layers" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------------ compare
def test_compare_checks_its_output_paths_before_the_runs(tmp_path, capsys):
    (tmp_path / "j.json").mkdir()  # the .json written next to the table
    (tmp_path / "afile").write_text("keep")
    for out, msg in ((tmp_path, "is a directory, not a file"), (tmp_path / "j.md", "j.json is a directory"),
                     (tmp_path / "afile" / "x.md", "afile is a file, not a directory")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            compare.main(["--seeds", "1", "--epochs", "1", "--out", str(out)])
        assert e.value.code == 2
        captured = capsys.readouterr()
        assert msg in captured.err and captured.out == "", captured  # refused before any run printed
    assert not (tmp_path / "j.md").exists() and (tmp_path / "afile").read_text() == "keep"


def test_compare_writes_markdown_table(tmp_path, capsys):
    out = tmp_path / "cmp.md"
    compare.main(("--seeds 2 --widths 16,32 --mlp-width 32 --epochs 1 --r 8 --train-subset 150 "
                  "--test-subset 100 --ridges 1e-3,1e-1").split() + ["--out", str(out)])  # fmt: skip
    table = out.read_text()
    assert table == capsys.readouterr().out.split("\n\n", 1)[1].rsplit("wrote", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    methods = [line.split("|")[1].strip() for line in lines]
    assert methods[0].startswith("NNGP") and methods[1].startswith("NTK")
    nets = ["finite π-net", "finite π-net", "MLP, no projection (μP)", "π-limit (infinite π-net)"]
    assert methods[2:] == nets
    for line in lines:
        mean, std = line.split("|")[3].split("±")
        assert 0 <= float(mean) <= 100 and float(std) >= 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert [len(r["accs"]) for r in raw["rows"]] == [1, 1, 2, 2, 2, 2]


def test_experiments_is_not_an_installed_package(tmp_path):
    # `experiments` is a common top-level name: installing it would shadow other projects'
    # packages. The jobs run from the checkout (`python -m experiments.train`); outside it the
    # installed pinet provides no `experiments` module.
    import subprocess
    import sys

    code = "import importlib.util, pinet; print(importlib.util.find_spec('experiments') is None)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_cli_optimizer_is_torch_fused_sgd_on_the_cpu():
    # One pass over gradient, momentum and weight per parameter (benchmarks/bench_step --sgd fused).
    args = train.build_parser().parse_args(["--r", "8", "--seed", "3"])
    model = build_model(args, 64, 10, torch.device("cpu"))
    opt, _ = build_optimizer(args, model)
    assert all(g["fused"] is True for g in opt.param_groups)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--widths", "abc"], "--widths: comma-separated widths >= r = 4"),
        (["--widths", ""], "--widths: comma-separated widths >= r = 4"),
        (["--widths", "2"], "--widths: comma-separated widths >= r = 4"),
        (["--seeds", "0"], "--seeds: must be a positive integer"),
        (["--omegas", "0"], "--omegas: must be a positive integer"),
        (["--threads", "-1"], "--threads: must be a positive integer"),
        (["--calibrate", "-1"], "--calibrate: must be >= 0"),
        (["--name", "sub/x"], "--name: a file name stem"),
    ],
)
def test_equivalence_cli_checks_its_flags_before_any_work(tmp_path, capsys, argv, msg):
    # Each of these was a traceback (ValueError, ZeroDivisionError, hypothesis InvalidArgument ...),
    # some only after the training, and --out was created first.
    from experiments import equivalence

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        equivalence.main(argv + ["--out", str(out), "--no-progress"])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err and not out.exists()
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(SystemExit):
        equivalence.main(["--out", str(tmp_path / "afile" / "sub")])
    assert "afile is a file, not a directory" in capsys.readouterr().err


def test_output_folders_under_a_file_and_bad_ridges_are_one_line_errors(tmp_path, capsys):
    # Each was a traceback (NotADirectoryError, a ridge ValueError) after the parsing, some late.
    from experiments import transfer_demo
    from experiments.imagenet import transfer_imagenet
    from experiments.meta import train as meta_train

    (tmp_path / "afile").write_text("keep")
    under = str(tmp_path / "afile" / "sub")
    cases = [
        (lambda: transfer_imagenet.main(["--imagenet-data", str(tmp_path), "--save-dir", under]), "afile is a file"),
        (lambda: meta_train.main(["x", "--dataset", "digits", "--first-order", "--output-folder", under]), "afile is a file"),
        (lambda: compare.main(["--ridges", "inf"]), "--ridges: finite numbers >= 0, got [inf]"),
        (lambda: compare.main(["--train-subset", "1"]), "--train-subset: must be >= 2"),
        (lambda: meta_train.main(["x", "--dataset", "digits", "--first-order", "--seed", str(2**64)]), "--seed must be an int"),
        (lambda: transfer_demo.main(["--ridge", "inf"]), "--ridge: must be a finite number >= 0, got inf"),
        (lambda: train.main(["--resume", str(tmp_path / "afile")]), "not a complete file written by torch.save"),
    ]
    for run, msg in cases:
        with pytest.raises(SystemExit) as e:
            run()
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        # argparse's own errors print the usage first; the error itself is the one last line
        assert msg in err.splitlines()[-1] and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "keep"


def test_a_fresh_run_into_an_earlier_runs_save_dir_says_so(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(FAST + ["--epochs", "1", "--save-dir", out, "--train-subset", "64"])
    assert "note:" not in capsys.readouterr().err
    train.main(FAST + ["--epochs", "1", "--save-dir", out, "--train-subset", "64"])
    err = capsys.readouterr().err
    assert "holds an earlier run's checkpoint.pt and log.csv; this run replaces them" in err and "--resume" in err


@pytest.mark.parametrize("widths, msg", [("64,64", "each width at most once"), ("64", "at least two distinct widths"),
                                         ("64,128,64", "each width at most once")])  # fmt: skip
def test_equivalence_cli_needs_two_distinct_widths_for_its_slope(tmp_path, capsys, widths, msg):
    # One width (or a repeated one) wrote "log-log slope | nan" into the table and exited 0.
    from experiments import equivalence

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        equivalence.main(["--config", "d0-sgd", "--widths", widths, "--seeds", "1", "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    assert f"argument --widths: {msg}" in capsys.readouterr().err and not out.exists()


def _edit(ckpt, path, value):
    *head, last = path
    target = ckpt
    for k in head:
        target = target[k]
    if value is _DROP:
        del target[last]
    else:
        target[last] = value


_DROP = object()


@pytest.mark.parametrize(
    "path, value, msg",
    [
        (["args"], 5, "its saved training flags ('args') must be a dict of flag values, got int"),
        (["args", "lr"], "x", "its saved --lr must be a number, got 'x'"),
        (["args", "batch_size"], 0, "saved training flags are invalid (argument --batch-size: must be a positive integer"),
        (["args", "momentum"], 1.5, r"saved training flags are invalid (argument --momentum: must be in [0, 1)"),
        (["args", "nesterov"], "yes", "its saved --nesterov must be a bool, got 'yes'"),
        (["args", "scheduler"], "linear", "its saved --scheduler must be one of ['none', 'cosine', 'multistep']"),
        (["args", "lr_drop_milestones"], [3, 1], "its saved --lr-drop-milestones must be a list the flag accepts"),
        (["args", "lr"], _DROP, "('args') lack --lr"),  # resumed silently at the parser's default lr
        (["history"], [5], "history[0] must be a dict (one epoch's row), got int"),
        (["history"], [{}], "history[0] has no 'epoch'"),
        (["history"], [], "'history' must hold one row per epoch (1), got 0 rows"),
        (["history", 0, "epoch"], 2, "history[0]['epoch'] must be 1, got 2"),
        (["history", 0, "train_loss"], "x", "history[0]['train_loss'] must be a number"),
    ],
)
def test_resume_refuses_malformed_saved_flags_and_history(tmp_path, capsys, path, value, msg):
    # Each was a traceback (exit 1: AttributeError, ZeroDivisionError, KeyError, a param_groups
    # error) or, for a missing flag, a run at today's default: now one line, exit 2, nothing written.
    import copy

    run = tmp_path / "run1"
    train.main(TINY + ["--save-dir", str(run)])
    ckpt = copy.deepcopy(torch.load(run / "checkpoint.pt", weights_only=True))
    _edit(ckpt, path, value)
    torch.save(ckpt, run / "checkpoint.pt")
    before = _files(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and str(run / "checkpoint.pt") in err, err
    assert _files(run) == before


def test_resume_takes_a_flag_the_checkpoint_lacks_from_the_command_line(tmp_path, capsys):
    # A checkpoint from before a flag existed is refused without it (it would train at today's
    # default), and resumes when the flag is given with the value that run used.
    import copy

    run = tmp_path / "run1"
    train.main(TINY + ["--save-dir", str(run)])
    ckpt = copy.deepcopy(torch.load(run / "checkpoint.pt", weights_only=True))
    lr = ckpt["args"].pop("lr")
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--no-progress"])
    assert "pass them on the command line with the values that run used" in capsys.readouterr().err
    train.main(["--resume", str(run / "checkpoint.pt"), "--epochs", "2", "--lr", str(lr), "--no-progress"])
    assert len(_log(run / "log.csv")) == 2
