"""What `predict` writes: the rows of a manifest or of the test set, gathered from every process, as CSV."""

import csv
import io
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from mnist_adder.data.mnist_files import write_atomic

# What predict_step returns for each picture, and the CSV columns it is written under: named so that no column
# of a person's manifest (their own digit, say) is taken for a prediction, or overwritten by one.
PREDICTED = {
    "digit": "pred_digit",
    "digit_prob": "pred_digit_prob",
    "sum": "pred_sum",
    "sum_prob": "pred_sum_prob",
    "unsure": "pred_unsure",  # "unsure" where the digit's calibrated probability is below calibration.UNSURE_BELOW
    "not_digit": "pred_not_digit",  # "not a digit" where MNISTAdder.answer says so
}
RESERVED = (*PREDICTED.values(), "error")  # a manifest with a column of these names is refused


def gather_shards(batches: list[dict]) -> list[dict]:
    """Under DDP each process predicted its own shard: every shard's batches, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batches
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, [{k: v.cpu() for k, v in batch.items()} for batch in batches])
    return [batch for shard in shards for batch in shard]


def gather_errors(rows: list[dict]) -> None:
    """Under DDP each process read the pictures of its own shard: every unreadable row's reason, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, {k: row["error"] for k, row in enumerate(rows) if row["error"]})
    for shard in shards:
        for k, error in shard.items():
            rows[k]["error"] = error


def fill_predictions(rows: list[dict], batches: list[dict]) -> None:
    """Write each batch's predictions into the manifest rows they belong to (each batch names its rows)."""
    for batch in batches:
        for k, row in enumerate(batch["row"].tolist()):
            rows[row].update({name: batch[key][k].item() for key, name in PREDICTED.items()})


def predictions_csv(columns: list[str], rows: list[dict]) -> bytes:
    """The manifest's own columns as written, then the predictions (empty where a row failed) and `error`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, [*columns, *RESERVED], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        predicted = {name: cell(row[name], name) for name in PREDICTED.values() if name in row}
        writer.writerow({**row["columns"], **predicted, "error": row["error"]})
    return out.getvalue().encode()


FLAGS = {"pred_unsure": "unsure", "pred_not_digit": "not a digit"}  # a flag's word in the CSV and the table


def cell(value, name: str) -> str | int:
    """A prediction as the CSV holds it under the column `name`: probabilities to four places, a flag as its word
    or nothing."""
    if isinstance(value, bool):
        return FLAGS[name] if value else ""
    return f"{value:.4f}" if isinstance(value, float) else value


def percent(probability: float) -> str:
    return f"{100 * probability:5.1f} %"


def note(row: dict) -> str:
    """The table's note: "not a digit" (the digit and its probabilities then mean little), else "unsure", or ""."""
    return next((word for name, word in reversed(FLAGS.items()) if row[name]), "")


def predictions_table(rows: list[dict]) -> str:
    width = max([4] + [len(row["file"]) for row in rows])
    lines = [f"{'file':<{width}}  number  pred_digit  {'prob':>7}  pred_sum  {'prob':>7}  note"]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['file']:<{width}}  {str(row['number']):>6}  {'':42}{row['error']}")
        else:
            digit, total = percent(row["pred_digit_prob"]), percent(row["pred_sum_prob"])
            lines.append(
                f"{row['file']:<{width}}  {row['number']:>6}  {row['pred_digit']:>10}  {digit}  {row['pred_sum']:>8}"
                f"  {total}  {note(row)}".rstrip()
            )
    return "\n".join(lines)


TEST_COLUMNS = ["index", "number", *PREDICTED, "true_digit", "true_sum"]  # written with PREDICTED's names


def test_set_predictions(batches: list[dict]) -> tuple[bytes, str]:
    """The official test set's predictions as CSV, one row per image in index order, and their accuracy."""
    columns = {key: torch.cat([batch[key].cpu() for batch in batches]) for key in TEST_COLUMNS}
    order = columns["index"].argsort()
    columns = {key: values[order].tolist() for key, values in columns.items()}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [PREDICTED.get(key, key) for key in TEST_COLUMNS]
    writer.writerow(names)
    for row in zip(*columns.values(), strict=True):
        writer.writerow([cell(v, name) for v, name in zip(row, names)])
    n = len(columns["index"])
    digit = sum(map(int.__eq__, columns["digit"], columns["true_digit"])) / max(n, 1)
    sum_ = sum(map(int.__eq__, columns["sum"], columns["true_sum"])) / max(n, 1)
    return out.getvalue().encode(), (
        f"official MNIST test set, {n} images with one number each: "
        f"digit accuracy {100 * digit:.2f} %, sum accuracy {100 * sum_:.2f} %"
    )


class PredictionsCSV(BasePredictionWriter):
    """Writes predictions.csv when `predict` ends, from Python as from the command line: the manifest's rows with
    their predictions (and each unreadable row's reason), or the official test set's. Under DDP every process
    predicts its share and rank 0 writes one complete file, atomically, to the data module's `predict_output`
    or into the run's folder. `failed` then counts the manifest rows that could not be predicted."""

    def __init__(self):
        super().__init__(write_interval="epoch")
        self.output, self.failed = None, 0

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = gather_shards(predictions)
        log_dir = trainer.log_dir  # a collective under DDP: every process asks
        datamodule = trainer.datamodule
        chosen = getattr(getattr(datamodule, "hparams", None), "predict_output", None)
        self.output = Path(chosen or Path(log_dir or trainer.default_root_dir) / "predictions.csv")
        rows = getattr(datamodule, "manifest_rows", None)
        if rows is not None:
            gather_errors(rows)
        self.failed = sum(bool(row["error"]) for row in rows) if rows is not None else 0
        if rows is None and not all(key in batch for batch in batches for key in TEST_COLUMNS):
            return  # neither a manifest nor the test set (a loader of the caller's own): nothing to write
        if not trainer.is_global_zero:
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if rows is None:
            text, summary = test_set_predictions(batches)
        else:
            fill_predictions(rows, batches)
            text, summary = predictions_csv(datamodule.manifest_columns, rows), predictions_table(rows) + "\n"
        write_atomic(self.output, text)
        print(f"{summary}\npredictions written to {self.output}")
