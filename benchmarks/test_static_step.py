import copy
import itertools
from functools import partial

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR

import conftest
from datamodule import MNISTAdderData, augment_draws
from lightning_module import MNISTAdder
from static_step import StaticStep
from test_model import quiet_trainer

STEPS = 5
synthetic_data_dir = conftest.synthetic_data_dir  # tests/conftest.py's fixture: benchmarks/ lies outside its reach


def model_and_data(data_dir) -> tuple[MNISTAdder, MNISTAdderData]:
    torch.manual_seed(0)
    model = MNISTAdder(
        channels=(8, 16, 16),
        hidden=32,
        convs_per_stage=2,
        sum_loss_weight=2.0,
        agreement=0.5,
        label_smoothing=0.1,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        scheduler=partial(OneCycleLR, max_lr=0.5, pct_start=0.4),
        scheduler_interval="step",
    )
    data = MNISTAdderData(data_dir=str(data_dir), batch_size=32, val_size=100, rotate=30.0, translate=0.1, scale=0.2)
    return model, data


def static_steps(model: MNISTAdder, data: MNISTAdderData) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    """STEPS steps of StaticStep over the train loader's first batches, as Lightning would feed them; the optimizer,
    and the [lr, momentum] each step ran with."""
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(0)
    optimizer = model.optimizer(model.parameters())
    scheduler = model.scheduler(optimizer, total_steps=STEPS)
    hp = data.hparams
    step = StaticStep(model.train(), optimizer, hp.batch_size, (hp.rotate, hp.translate, hp.scale))
    schedule = []
    for batch in itertools.islice(loader, STEPS):
        step.load(batch, augment_draws(hp.batch_size, data.train_set.augment_generator))
        schedule.append(torch.stack(step.hyper[0]))
        step.step()
        scheduler.step()
    return optimizer, torch.stack(schedule)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # the static step is no optimizer.step()
def test_static_steps_equal_lightnings_eager_steps(tmp_path, synthetic_data_dir):
    """Five steps on static buffers leave the weights, BatchNorm statistics and SGD momentum buffers that five
    Lightning steps leave: the same batches, augmentation draws, loss weights and OneCycle schedule, whose lr and
    momentum change every step."""
    eager, data = model_and_data(synthetic_data_dir)
    static = copy.deepcopy(eager)
    start = copy.deepcopy(eager.net.state_dict())
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0)
    trainer.fit(eager, data)
    optimizer, schedule = static_steps(static, model_and_data(synthetic_data_dir)[1])
    assert (schedule.diff(dim=0) != 0).all()  # lr and momentum, from one step to the next
    for name, value in eager.net.state_dict().items():
        assert torch.allclose(static.net.state_dict()[name].float(), value.float(), atol=1e-6), name
        assert not torch.equal(start[name], value), name  # every weight and statistic moved
    buffers = [trainer.optimizers[0].state[p]["momentum_buffer"] for p in eager.parameters()]
    for expected, p in zip(buffers, static.parameters(), strict=True):
        assert torch.allclose(optimizer.state[p]["momentum_buffer"], expected, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer, clip",
    [(partial(torch.optim.Adam, lr=1e-3), 0.0), (partial(torch.optim.SGD, lr=0.1, dampening=0.1), 0.0), (None, 1.0)],
    ids=["Adam", "dampening", "clipping"],
)
def test_the_static_step_refuses_what_it_would_not_do_as_the_eager_step(optimizer, clip):
    model = MNISTAdder(channels=(4, 8, 8), hidden=16, gradient_clip_val=clip)
    with pytest.raises(ValueError, match="the static training step takes torch.optim.SGD without dampening"):
        StaticStep(model, (optimizer or model.optimizer)(model.parameters()), 4, (0.0, 0.0, 0.0))
