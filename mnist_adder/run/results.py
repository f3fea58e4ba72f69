"""What a finished fit prints: the official test set's figures from its summary (results.json's content)."""

PERCENTAGES = (
    ("test/digit_acc", "digit accuracy (fixed pairs)"),
    ("test/sum_acc", "sum accuracy (fixed pairs)"),
    ("test/sum_acc_all_pairs", "sum accuracy (each image with all 10 numbers)"),
    ("test/sum_consistency_all_pairs", "sum = predicted digit + number (all pairs)"),
)


def results_table(summary: dict) -> str:
    """The tested checkpoint, the fit's time, the accuracies and each head's calibration error before -> after."""
    rows = [
        ("checkpoint", summary["checkpoint"] or "(weights at the end of fit)"),
        ("fit time", f"{summary['fit_seconds']:.1f} s"),
    ]
    rows += [(label, f"{100 * summary[key]:.2f} %") for key, label in PERCENTAGES if key in summary]
    rows += [
        (f"{head} calibration error", f"{100 * summary[key + '_uncalibrated']:.2f} % -> {100 * summary[key]:.2f} %")
        for head, key in (("digit", "test/digit_ece"), ("sum", "test/sum_ece"))
        if key in summary
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(["", "Official MNIST test set", *(f"  {label:<{width}}  {value}" for label, value in rows)])
