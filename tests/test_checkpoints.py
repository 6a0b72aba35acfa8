"""Checkpoints that are corrupt, hand-edited or a fork's, read by every script that reads one (a resumed
mdra.py, eval_knn.py, finetune.py fine-tuning, resuming, --export and --predict): each fault is one
sentence naming the field or the tensors, and exit status 2, before any long work and without writing
over the checkpoint. Made from real tiny checkpoints, once per module."""
import math

import pytest
import torch
from PIL import Image

import eval_knn
import finetune
import mdra
import runtime

PRETRAIN = ["--no-compile", "--warmup-epochs", "1", "--data", "synthetic:64", "--img-size", "8", "--arch", "resnet10-w8", "--hidden-dim", "32",
            "--batch-size", "16", "--queue-size", "64", "--workers", "0", "--device", "cpu", "--epochs", "1"]
FINETUNE = ["--data", "synthetic:64", "--batch-size", "8", "--workers", "0", "--label-fraction", "0.25",
            "--epochs", "1", "--device", "cpu"]
NAN = math.nan


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return mdra.main([*PRETRAIN, "--out-dir", str(tmp_path_factory.mktemp("pretrain"))])


@pytest.fixture(scope="module")
def classifier(pretrained, tmp_path_factory):
    return finetune.main([*FINETUNE, "--ckpt", str(pretrained), "--out-dir", str(tmp_path_factory.mktemp("finetune"))])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def other_optimizer(c):
    c["optimizer"] = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9).state_dict()


# (reader, the edit of its checkpoint (the pretraining's, or the classifier's for ft-resume, export, predict),
# the sentence; {ckpt}: the edited checkpoint's path).
CASES = [
    ("resume", lambda c: c.update(step=-5), "{ckpt}: step is -5, not an integer >= 0."),
    ("resume", lambda c: c.update(step=True), "{ckpt}: step is True, not an integer >= 0."),
    ("resume", lambda c: c["offline"]["backbone.conv1.weight"].view(-1)[:1].fill_(NAN),
     "{ckpt} holds non-finite values in offline.backbone.conv1.weight (1 tensor); it cannot be used."),
    ("resume", lambda c: c["queue"][5, 7].fill_(math.inf), "{ckpt} holds non-finite values in queue (1 tensor); "
                                                           "it cannot be used."),
    ("resume", lambda c: c.update(queue_ptr=64), "{ckpt}: queue_ptr is 64, not an integer from 0 to 63, a row of the "
                                                 "queue."),
    ("resume", lambda c: c.update(queue_ptr=8),
     "{ckpt}: queue_ptr is 8, not a multiple of the batch of 16 keys that enqueue writes."),
    ("resume", lambda c: c.update(queue=c["queue"][:32]), "{ckpt}: queue is shaped [32, 256], not [64, 256] as this "
                                                          "run's."),
    ("resume", lambda c: c.update(queue=c["queue"][:, 0]), "{ckpt}: queue is a float32 tensor of shape [64], not a "
                                                           "2-d float tensor."),
    ("resume", lambda c: c["online"].update({"predictor.3.weight": torch.zeros(128, 32)}),
     "the online network in {ckpt} does not match the model: mis-shaped keys predictor.3.weight."),
    ("resume", other_optimizer,
     "{ckpt}: optimizer is not a state of this run's optimizer (another network's or optimizer's); it cannot be "
     "resumed."),
    ("resume", lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(1, 8, 3, 3)),
     "{ckpt}: optimizer is not a state of this run's optimizer (another network's or optimizer's); it cannot be "
     "resumed."),
    ("resume", lambda c: c["optimizer"]["param_groups"][0].update(momentum="0.9"),
     "{ckpt}: optimizer is not a state of this run's optimizer (another network's or optimizer's); it cannot be "
     "resumed."),
    ("resume", lambda c: c["optimizer"]["param_groups"][1].update(lr=NAN),
     "{ckpt}: optimizer holds non-finite values; it cannot be resumed."),
    ("resume", lambda c: c.update(optimizer=[]), "{ckpt}: optimizer is [], not a dict."),
    ("resume", lambda c: c.update(scaler={"scale": 1.0}),
     "{ckpt}: scaler is {'scale': 1.0}, not empty or a GradScaler's state of finite numbers."),
    ("resume", lambda c: c.update(epoch_loss={"sum": NAN, "from": 0}),
     "{ckpt}: epoch_loss is {'sum': nan, 'from': 0}, not None or a dict of a finite sum and the step it sums from, "
     "at most step."),
    ("resume", lambda c: c.update(epoch_loss={"sum": 1.0, "from": 9}),
     "{ckpt}: epoch_loss is {'sum': 1.0, 'from': 9}, not None or a dict of a finite sum and the step it sums from, "
     "at most step."),
    ("resume", lambda c: c["data"].update(images="64"),
     "{ckpt}: data is a dict of length 2, not a dict of the number of images and their names' SHA-256."),
    ("resume", lambda c: c.update(batchnorm_batch=0), "{ckpt}: batchnorm_batch is 0, not an integer >= 1."),
    ("knn", lambda c: c["backbone"]["conv1.weight"].view(-1)[:1].fill_(NAN),  # the online backbone's tensor too
     "{ckpt} holds non-finite values in backbone.conv1.weight, online.encoder.backbone.conv1.weight (2 tensors); it "
     "cannot be used."),
    ("knn", lambda c: [t.fill_(NAN) for t in c["backbone"].values() if t.is_floating_point()],
     "{ckpt} holds non-finite values in backbone.conv1.weight, backbone.bn1.weight, backbone.bn1.bias, ... "
     "(120 tensors); it cannot be used."),
    ("knn", lambda c: c.update(arch=5), "{ckpt}: arch is 5, not a string."),
    ("knn", lambda c: c.update(small_stem="yes"), "{ckpt}: small_stem is 'yes', not True or False."),
    ("knn", lambda c: c.update(backbone=[1, 2, 3]), "{ckpt}: backbone is [1, 2, 3], not a dict of tensors by name."),
    ("knn", lambda c: c["backbone"].update({"conv1.weight": [0.0]}),
     "{ckpt}: backbone is a dict of length 72, not a dict of tensors by name."),
    ("knn", lambda c: c["args"].update(data=5),
     "{ckpt}: args is a dict of length 36, not a dict whose data and data_dir are strings."),
    ("knn", lambda c: c.update(img_size=4),
     "{ckpt}: img_size is 4, not an integer >= 8, the smallest crop any network processes."),
    ("knn", lambda c: c.update(mean=[0.5, 0.5]), "{ckpt}: mean is [0.5, 0.5], not three finite numbers."),
    ("finetune", lambda c: c["backbone"]["layer1.0.bn1.running_var"].fill_(NAN),
     "{ckpt} holds non-finite values in backbone.layer1.0.bn1.running_var, "
     "online.encoder.backbone.layer1.0.bn1.running_var (2 tensors); it cannot be used."),
    ("finetune", lambda c: c.update(feature_dim=0), "{ckpt}: feature_dim is 0, not an integer >= 1."),
    ("finetune", lambda c: c.update(epoch=-1), "{ckpt}: epoch is -1, not an integer >= 0."),
    ("finetune", lambda c: c.update(std=[0.25, 0.0, 0.25]), "{ckpt}: std is [0.25, 0.0, 0.25], not three finite "
                                                            "numbers > 0."),
    ("ft-resume", lambda c: c.update(step=-5), "{ckpt}: step is -5, not an integer >= 0."),
    ("ft-resume", other_optimizer,
     "{ckpt}: optimizer is not a state of this run's optimizer (another network's or optimizer's); it cannot be "
     "resumed."),
    ("ft-resume", lambda c: c.update(metrics={"epoch": 1}),
     "{ckpt}: metrics is {'epoch': 1}, not a dict, empty or with the epoch, top1 and top5."),
    ("export", lambda c: c.update(std=[0.25, 0.0, 0.25]), "{ckpt}: std is [0.25, 0.0, 0.25], not three finite "
                                                          "numbers > 0."),
    ("export", lambda c: c["head"]["bias"].fill_(NAN),
     "{ckpt} holds non-finite values in head.bias (1 tensor); it cannot be used."),
    ("export", lambda c: c["head"].update(weight=torch.zeros(5, 64)),
     "the classifier head in {ckpt} does not match the model: mis-shaped keys weight."),
    ("export", lambda c: c.update(num_classes=1), "{ckpt}: num_classes is 1, not an integer >= 2."),
    ("predict", lambda c: c["head"]["weight"].fill_(NAN),
     "{ckpt} holds non-finite values in head.weight (1 tensor); it cannot be used."),
    ("predict", lambda c: c.update(std=[0.0] * 3), "{ckpt}: std is [0.0, 0.0, 0.0], not three finite numbers > 0."),
    ("predict", lambda c: c.update(mean=[NAN, 0.5, 0.5]), "{ckpt}: mean is [nan, 0.5, 0.5], not three finite numbers."),
    ("predict", lambda c: c.update(std=torch.full((3,), 0.25)),
     "{ckpt}: std is a float32 tensor of shape [3], not three finite numbers > 0."),
    ("predict", lambda c: c.update(resize=0), "{ckpt}: resize is 0, not an integer >= img_size (8)."),
    ("predict", lambda c: c.update(class_names=c["class_names"][:9]),
     "{ckpt}: class_names is a list of length 9, not a list of num_classes (10) strings."),
    ("predict", lambda c: c.update(class_names=list(range(10))),
     "{ckpt}: class_names is a list of length 10, not a list of num_classes (10) strings."),
    ("predict", lambda c: c.update(small_stem=False, img_size=16, resize=16),
     "{ckpt}: img_size is 16, not an integer >= 32, the smallest crop of its network."),
]


def run_reader(reader, ckpt, pretrained, tmp_path):
    """The reader's main on the edited checkpoint ckpt (for a resume, the one in its --out-dir)."""
    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    script, argv = {
        "resume": (mdra, [*PRETRAIN, "--out-dir", str(ckpt.parent)]),
        "knn": (eval_knn, ["--ckpt", str(ckpt), "--k", "5", "--workers", "0", "--device", "cpu"]),
        "finetune": (finetune, [*FINETUNE, "--ckpt", str(ckpt), "--out-dir", str(tmp_path / "run")]),
        "ft-resume": (finetune, [*FINETUNE, "--ckpt", str(pretrained), "--out-dir", str(ckpt.parent)]),
        "export": (finetune, ["--ckpt", str(ckpt), "--export", str(tmp_path / "model.pt")]),
        "predict": (finetune, ["--ckpt", str(ckpt), "--predict", str(image)]),
    }[reader]
    script.main(argv)


@pytest.mark.parametrize("reader, edit, message", CASES, ids=[f"{r}-{m.split(': ')[-1][:40]}" for r, _, m in CASES])
def test_a_bad_checkpoint_field_is_one_sentence_naming_it_and_exit_status_2(reader, edit, message, pretrained,
                                                                            classifier, tmp_path, capsys):
    ckpt = load(classifier if reader in ("ft-resume", "export", "predict") else pretrained)
    edit(ckpt)
    path = tmp_path / "out" / "checkpoint.pth"  # where a resumed run finds it
    path.parent.mkdir()
    torch.save(ckpt, path)
    written = path.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_reader(reader, path, pretrained, tmp_path)
    assert exit_info.value.code == 2
    prog = {"resume": "mdra.py", "knn": "eval_knn.py"}.get(reader, "finetune.py")
    assert capsys.readouterr().err == f"{prog}: error: {message.replace('{ckpt}', str(path))}\n"
    assert path.read_bytes() == written and not (tmp_path / "model.pt").exists()


def test_a_checkpoint_without_the_fields_added_later_still_resumes(pretrained, tmp_path, capsys):
    """Checkpoints written before data, batchnorm_batch and epoch_loss were kept lack them: absent is no fault."""
    ckpt = {k: v for k, v in load(pretrained).items() if k not in ("data", "batchnorm_batch", "epoch_loss")}
    (tmp_path / "out").mkdir()
    torch.save(ckpt, tmp_path / "out" / "checkpoint.pth")
    assert mdra.main([*PRETRAIN, "--out-dir", str(tmp_path / "out")]) == tmp_path / "out" / "checkpoint.pth"
    assert f"resumed from {tmp_path / 'out' / 'checkpoint.pth'} at step 4" in capsys.readouterr().out


def test_the_checkpoints_the_scripts_write_pass_the_checks(pretrained, classifier):
    for path, fmt in ((pretrained, "mdra"), (classifier, finetune.CLASSIFIER_FORMAT)):
        assert runtime.load_checkpoint(path, (fmt,)).keys() == load(path).keys()
