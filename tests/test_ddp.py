"""DDP on CPU (gloo, two processes): the same weights as one process with one all-reduce per step, the same
BatchNorm statistics validated on every process, every sample counted once, a divergence on one process stops
them all, predict writes one CSV."""

import copy
import csv
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from lightning import Callback, Trainer
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.multiprocessing import ProcessExitedException
from torch.utils.data import BatchSampler

from datamodule import AllPairs, EpochSampler, MNISTAdderData
from lightning_module import MNISTAdder
from mnist_adder.model.feature_distance import FeatureStats, feature_distance
from test_cli import ROOT

pytestmark = pytest.mark.slow


ALL_REDUCES = []  # in each spawned process: one entry per gradient bucket all-reduced


def counting_allreduce(state, bucket):
    ALL_REDUCES.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


class SaveWeights(Callback):
    """Each process's weights at the end, and how many all-reduces each training step made."""

    def __init__(self, folder):
        self.folder, self.per_step = folder, []

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)  # Lightning registers hooks on CUDA only

    def on_train_batch_end(self, trainer, *args):
        self.per_step.append(len(ALL_REDUCES))
        ALL_REDUCES.clear()

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "state": pl_module.state_dict(),
                "all_reduces_per_step": self.per_step,
                "threads": torch.get_num_threads(),
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )


class BuffersAtValidation(Callback):
    """Each process's BatchNorm statistics at the first validation after training began: before the module's
    hook (callbacks run first) and as its first batch meets them."""

    def __init__(self, folder):
        self.folder, self.seen = folder, {}

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking and not self.seen:
            self.seen["before"] = {k: v.clone() for k, v in pl_module.net.named_buffers()}

    def on_validation_batch_start(self, trainer, pl_module, *args):
        if not trainer.sanity_checking and "during" not in self.seen:
            self.seen["during"] = {k: v.clone() for k, v in pl_module.net.named_buffers()}
            torch.save(self.seen, self.folder / f"buffers{trainer.global_rank}.pt")


class CountTestSamples(Callback):
    """How many images and pairs each process's test metrics hold, before they are synced."""

    def __init__(self, folder):
        self.folder = folder

    def on_test_epoch_end(self, trainer, pl_module):  # runs before the module's hook, which syncs and logs
        counts = {
            "images": pl_module.test_metrics["digit_loss"].weight.item(),
            "pairs": pl_module.test_metrics["sum_consistency_all_pairs"].weight.item(),
        }
        torch.save(counts, self.folder / f"counts{trainer.global_rank}.pt")


def new_model():
    """One conv a stage: with the default's two, float32 alone ends 7e-4 from float64 on the first conv after
    these 4 steps (six BatchNorms over batches of 25), too near what a wrongly reduced gradient would show."""
    torch.manual_seed(0)
    sgd = partial(torch.optim.SGD, lr=0.05)
    return MNISTAdder(channels=(8, 16, 16), convs_per_stage=1, hidden=32, optimizer=sgd, scheduler=None)


def new_data(data_dir, batch_size):
    return MNISTAdderData(data_dir=str(data_dir), batch_size=batch_size, val_size=100, rotate=0, translate=0, scale=0)


class OddTestSet(MNISTAdderData):
    """The 101 validation images as the test set, alone and with all ten numbers (1,010 pairs)."""

    def __init__(self, data_dir):
        super().__init__(data_dir=str(data_dir), val_size=101)

    def setup(self, stage):
        super().setup(stage)
        self.test_set = self.val_set
        self.all_pairs_set = AllPairs(self.val_set.images, self.val_set.digits)


def one_process_over_the_same_global_batches(data_dir, epochs, steps_per_epoch):
    """Plain PyTorch: each step, the two ranks' batches, each through the net (BatchNorm sees one rank's
    batch, as under DDP), the two backward passes per batch, the gradients averaged, one SGD step."""
    data = new_data(data_dir, 25)
    data.setup("fit")
    samplers = [
        EpochSampler(data.train_set, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True) for r in (0, 1)
    ]
    model = new_model()
    optimizer = model.optimizer(model.parameters())
    for epoch in range(epochs):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        for _, batches in zip(range(steps_per_epoch), zip(*(BatchSampler(s, 25, drop_last=True) for s in samplers))):
            optimizer.zero_grad()
            for indices in batches:
                batch = data.train_set.__getitems__(indices)
                losses = model.losses(model(batch["image"], batch["number"]), batch)
                (losses.digit_loss / 2).backward(retain_graph=True)
                (model.sum_loss_weight * (losses.sum_loss + losses.agreement) / 2).backward()
            optimizer.step()
    return model.state_dict()


def spawned(run):
    """Runs a ddp_spawn fit or test, once more if a process aborted: gloo's threads now and then abort a
    process at exit ("terminate called without an active exception") after its work is done. A Python
    error in a process fails at once; a second abort fails too."""
    try:
        return run()
    except ProcessExitedException as crash:
        if crash.signal_name != "SIGABRT":
            raise
        return run()


def test_ddp_weights_and_metrics_match_one_process(tmp_path, real_data_dir):
    """On real MNIST: spawned processes re-import the modules, so a test's monkeypatching would not reach them.
    The second test set holds 101 images, which two processes cannot split evenly: a sampler that pads the
    shorter shard would count one image twice and change the accuracies."""
    model, data = new_model(), new_data(real_data_dir, 25)
    ddp = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[SaveWeights(tmp_path), BuffersAtValidation(tmp_path), CountTestSamples(tmp_path)],
    )
    spawned(lambda: ddp.fit(model, data))
    # DDP stopped broadcasting the buffers after the first step: each process's statistics drifted with its own
    # batches, and the module hands every process rank 0's before validating
    buffers = [torch.load(tmp_path / f"buffers{rank}.pt") for rank in (0, 1)]
    assert not torch.equal(buffers[0]["before"]["image.2.running_mean"], buffers[1]["before"]["image.2.running_mean"])
    for name, value in buffers[0]["during"].items():
        assert torch.equal(value, buffers[1]["during"][name]) and torch.equal(value, buffers[0]["before"][name]), name
    saved0, saved1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    rank0, rank1 = saved0["state"], saved1["state"]
    # the two backward passes reduce the gradients once (the first runs under no_sync); one bucket here
    assert saved0["all_reduces_per_step"] == saved1["all_reduces_per_step"] == [1] * 4
    # With as many threads as each process had (Lightning shares the cores out): float sums in another order
    # grow fast through small BatchNorm batches (measured: 3e-4 on the first conv after these 4 steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(saved0["threads"])
    try:
        alone = one_process_over_the_same_global_batches(real_data_dir, epochs=2, steps_per_epoch=2)
    finally:
        torch.set_num_threads(threads)
    for name, _ in model.named_parameters():
        assert torch.equal(rank0[name], rank1[name]), name
        # measured: 2e-8 (the gradients averaged in another order); a wrongly reduced gradient is off by ~1e-2
        assert torch.allclose(rank0[name], alone[name], atol=1e-6, rtol=1e-5), name
    # "not a digit": the last validation measured the distance to the feature images both processes read (each its
    # shard's first batch: the first 2,000), as one process measures it with rank 0's net
    reference, stats = new_model().eval(), FeatureStats(model.net.feature_size)
    reference.load_state_dict(rank0)
    data.setup("validate")
    with torch.no_grad():
        images = data.feature_set.__getitems__(list(range(2000)))
        features = reference.net.image_features(images["image"])
    stats.update(features, images["digit"])
    means, whitening = stats.compute()
    expected = feature_distance(features, means @ whitening, whitening)
    for rank in (rank0, rank1):  # measured: 1.3e-6 apart; fitted on one process's images alone: 0.11 (median)
        got = feature_distance(features, rank["feature_means"], rank["feature_whitening"])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    # every validation and test image and every (image, number) pair counted exactly once under DDP
    single = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single_results = single.test(copy.deepcopy(model), new_data(real_data_dir, 25), verbose=False) + single.test(
        copy.deepcopy(model), OddTestSet(real_data_dir), verbose=False
    )
    ddp_results = []
    for test_data, images in ((data, (5000, 5000)), (OddTestSet(real_data_dir), (51, 50))):
        ddp_results += spawned(lambda: ddp.test(copy.deepcopy(model), test_data, verbose=False))  # noqa: B023
        # each process holds its own shard's samples: ratios alone would hide both processes adding into
        # one metric state (the sum would count every sample twice), and an update lost between them
        counts = [torch.load(tmp_path / f"counts{rank}.pt") for rank in (0, 1)]
        assert counts == [{"images": n, "pairs": 10 * n} for n in images]
    accuracies = [{k: v for k, v in r.items() if "acc" in k} for r in ddp_results]
    assert accuracies == [{k: v for k, v in r.items() if "acc" in k} for r in single_results]  # exactly
    for ddp_result, single_result in zip(ddp_results, single_results):  # mean losses: summed in another order
        assert ddp_result == pytest.approx(single_result, rel=1e-6, abs=1e-6)  # ECEs of ~1e-4 differ by ~1e-7


def cli_under_ddp(tmp_path, *args, timeout=600):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            *args,
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"},
    )


class NaNOnRankOne(Callback):
    """The images of one of rank 1's batches (the third) turn NaN: only that process sees a non-finite loss."""

    batch = 2

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == self.batch:
            batch["image"].fill_(float("nan"))


class NaNOnRankOneBeforeASave(NaNOnRankOne):
    """The fourth batch: its step ends in a checkpoint, before the NaN gradients reach rank 0's loss."""

    batch = 3


@pytest.mark.parametrize(
    "save",
    [
        ["--trainer.callbacks+=test_ddp.NaNOnRankOne"],
        [
            "--trainer.callbacks+=test_ddp.NaNOnRankOneBeforeASave",
            "--last_checkpoint.every_n_train_steps",
            "4",
            "--checkpoint.monitor",
            "null",
        ],
    ],
    ids=["found at the epoch's end", "found before a mid-epoch save"],
)
def test_a_divergence_on_one_process_stops_every_process(tmp_path, real_data_dir, save):
    """Found by the periodic check at the epoch's end, or by the check before a checkpoint at step 4 (before the
    first periodic check), which every process must take together: one process raising alone would leave the
    other waiting at the save's barrier."""
    done = cli_under_ddp(
        tmp_path,
        "fit",
        *save,
        "--data.data_dir",
        str(real_data_dir),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "10",
        timeout=300,
    )  # a process left waiting in an all-reduce would hang until this timeout
    assert done.returncode != 0 and "non-finite loss" in done.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_predict_under_ddp_writes_one_complete_csv(tmp_path, real_data_dir):
    trained = cli_under_ddp(
        tmp_path,
        "fit",
        "--data.data_dir",
        str(real_data_dir),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "20",
        "--trainer.limit_val_batches",
        "1",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.count("sum accuracy (each image with all 10 numbers)") == 1
    assert trained.stdout.count("epoch 1/1  step") == 1  # the epoch's line from rank 0 alone
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    done = cli_under_ddp(
        tmp_path,
        "predict",
        "--ckpt_path",
        str(last),
        "--data.data_dir",
        str(real_data_dir),
        "--data.predict_output",
        str(tmp_path / "test.csv"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "test.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(10_000))
    assert done.stdout.count("predictions written to") == 1
    # the example pictures with unreadable rows between them: each process predicts its share of the readable
    # ones, and every answer lands on its own row, as one process writes them
    pictures = ROOT / "examples" / "pictures"
    lines = ["file,number,id"]
    for k, row in enumerate(csv.DictReader((pictures / "inputs.csv").open())):
        lines += [f"missing{k}.png,{row['number']},m{k}", f"{pictures / row['file']},{row['number']},p{k}"]
    (tmp_path / "inputs.csv").write_text("\n".join(lines) + "\n")
    predict = [
        "predict",
        "--ckpt_path",
        str(last),
        "--data.data_dir",
        str(real_data_dir),
        "--data.predict_manifest",
        str(tmp_path / "inputs.csv"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    done = cli_under_ddp(tmp_path, *predict, "--data.predict_output", str(tmp_path / "ddp.csv"))
    unreadable = f"{len(lines) // 2} of {len(lines) - 1} rows could not be predicted"
    assert done.returncode != 0 and unreadable in done.stderr, done.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *predict, "--data.predict_output", str(tmp_path / "one.csv")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert single.returncode != 0 and unreadable in single.stderr, single.stderr[-3000:]
    rows, expected = (list(csv.DictReader((tmp_path / name).open())) for name in ("ddp.csv", "one.csv"))
    assert [r["id"] for r in rows] == [line.split(",")[2] for line in lines[1:]]
    assert rows == expected and all(r["pred_digit"] for r in rows if r["id"].startswith("p"))
    (tmp_path / "single_row.csv").write_text(f"file,number\n{pictures / row['file']},3\n")  # one row, two processes
    done = cli_under_ddp(tmp_path, *predict[:-3], str(tmp_path / "single_row.csv"), timeout=300)  # waiting: a timeout
    assert done.returncode != 0 and "1 row(s) to predict for 2 processes" in done.stderr, done.stderr[-3000:]
