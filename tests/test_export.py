"""ViT-5 as a backbone and in deployment: timm's features_only, FX (torch.fx, torchvision's and timm's
feature extractors), TorchScript (script and trace, saved and reloaded), both ONNX exporters run in
onnxruntime, torch.export with a dynamic batch and image size, and torch.compile. Each must give the
eager outputs of vit5_tiny (2 blocks) within 1e-4 in float32, and see only plain ops."""
import io
import warnings
from pathlib import Path

import onnx  # noqa: F401  (requirements-test.txt: the legacy exporter writes through it)
import onnxruntime
import onnxscript  # noqa: F401  (requirements-test.txt: the dynamo exporter needs it)
import pytest
import timm
import torch
from torch.export import Dim

import models_vit5  # noqa: F401  (registers the vit5_* models with timm)


ATOL = 1e-4
SIZES = [(2, 3, 64, 64), (3, 3, 48, 80)]  # the build size, then another batch and a rectangular size


@pytest.fixture(scope='module')
def model():
    """vit5_tiny (192 wide, 3 heads) with 2 blocks built at 64 px; LayerScale raised so the blocks count."""
    torch.manual_seed(0)
    model = timm.create_model('vit5_tiny', depth=2, img_size=64, num_classes=10).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.gamma_1.fill_(0.5)
            blk.gamma_2.fill_(0.5)
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for shape in SIZES]


def assert_same_logits(model, run, xs=None):
    for x in xs or inputs():
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), atol=ATOL, rtol=0)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation notes of jit / the legacy exporter
        yield


# ---- backbone: features_only and FX ------------------------------------------------------------------
def test_features_only_gives_the_blocks_patch_maps(model, tmp_path):
    path = tmp_path / 'weights.pth'
    torch.save({'model': model.state_dict()}, path)
    backbone = timm.create_model('vit5_tiny', depth=2, img_size=64, features_only=True, out_indices=(0, 1),
                                 pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert type(backbone).__name__ == 'FeatureGetterNet'
    assert backbone.feature_info.channels() == [192, 192] and backbone.feature_info.reduction() == [16, 16]
    for x in inputs():
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        with torch.no_grad():
            feats = backbone(x)
            expect = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert [f.shape for f in feats] == [(x.shape[0], 192, h, w)] * 2
        for f, e in zip(feats, expect):
            torch.testing.assert_close(f, e, atol=ATOL, rtol=0)


def test_torch_fx_symbolic_trace(model):
    graph = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in graph.graph.nodes}
    assert not any('complex' in t or 'RMSNormCPU' in t for t in targets)  # the CPU fast paths stay eager-only
    assert_same_logits(model, graph)


def test_torchvision_feature_extractor(model):
    from torchvision.models.feature_extraction import create_feature_extractor
    extractor = create_feature_extractor(model, return_nodes={'blocks.1': 'tokens', 'head': 'logits'})
    assert_same_logits(model, lambda x: extractor(x)['logits'])
    x = inputs()[1]
    with torch.no_grad():
        tokens = extractor(x)['tokens']
        last = model.forward_intermediates(x, indices=[1], output_fmt='NLC', intermediates_only=True)[0]
    torch.testing.assert_close(tokens[:, model.num_prefix_tokens:], last, atol=ATOL, rtol=0)


def test_timm_feature_extractor(model):
    extractor = timm.models.create_feature_extractor(model, return_nodes={'head': 'logits'})
    assert_same_logits(model, lambda x: extractor(x)['logits'])


# ---- TorchScript --------------------------------------------------------------------------------------
def save_and_load(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def test_torchscript_script_save_load(model):
    loaded = save_and_load(torch.jit.script(model))
    assert_same_logits(model, loaded)


def test_torchscript_trace_save_load_in_training_mode():
    # traced with autograd recording in train mode, where eager would take the CPU fast paths
    torch.manual_seed(0)
    model = timm.create_model('vit5_tiny', depth=2, img_size=64, num_classes=10).train()
    x = inputs()[0]
    traced = torch.jit.trace(model, x, check_trace=False)
    assert 'PythonOp' not in str(traced.graph) and 'complex' not in str(traced.graph)
    loaded = save_and_load(traced)
    model.eval()
    loaded.eval()
    assert_same_logits(model, loaded, [x])


# ---- ONNX ---------------------------------------------------------------------------------------------
def onnx_session(proto: bytes):
    return onnxruntime.InferenceSession(proto, providers=['CPUExecutionProvider'])


def run_onnx(session, x):
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def shown_to_a_user(caught):
    """The recorded warnings a script would print: Python hides a DeprecationWarning raised inside a library
    (torch's exporter notes about its own internals) and shows every other."""
    torch_dir = Path(torch.__file__).parent
    return [f'{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}' for w in caught
            if not (issubclass(w.category, DeprecationWarning) and torch_dir in Path(w.filename).parents)]


def test_onnx_legacy_exporter_dynamic_batch_quietly(model, tmp_path):
    # the README's command: the model draws no TracerWarning (it reads the traced size as plain ints once);
    # torch's own notice that this exporter is legacy is silenced, and only that
    x, path = inputs()[0], tmp_path / 'vit5_legacy.onnx'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        warnings.filterwarnings('ignore', 'You are using the legacy TorchScript-based ONNX export')
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=['image'],
                          output_names=['logits'], dynamic_axes={'image': {0: 'batch'}, 'logits': {0: 'batch'}})
    assert shown_to_a_user(caught) == []
    session = onnx_session(str(path))
    assert_same_logits(model, lambda t: run_onnx(session, t), [x, torch.randn(5, 3, 64, 64)])


def test_onnx_dynamo_exporter_dynamic_batch_and_size(model, tmp_path):
    path = tmp_path / 'vit5.onnx'
    torch.onnx.export(model, (inputs()[0],), str(path), dynamo=True, dynamic_shapes=DYNAMIC, verbose=False)
    assert (tmp_path / 'vit5.onnx.data').is_file()  # the weights, beside the graph (the README says so)
    session = onnx_session(str(path))
    assert_same_logits(model, lambda t: run_onnx(session, t))


# ---- torch.export and torch.compile -------------------------------------------------------------------
# The dynamic_shapes spec of the README: any batch, any image side that is a multiple of the patch size
# (at least 2 patches: export specialises sizes 0 and 1).
DYNAMIC = {'x': {0: Dim('batch', min=1, max=256), 2: 16 * Dim('rows', min=2, max=64),
                 3: 16 * Dim('cols', min=2, max=64)}}


def test_torch_export_dynamic_batch_and_image_size(model):
    program = torch.export.export(model, (inputs()[0],), dynamic_shapes=DYNAMIC)
    module = program.module()
    assert_same_logits(model, module)
    assert_same_logits(model, module, [torch.randn(1, 3, 32, 112)])
    with pytest.raises(Exception):  # outside the spec: not a multiple of 16
        module(torch.randn(1, 3, 40, 64))


def test_torch_compile_dynamic_sizes(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='eager', dynamic=True)  # dynamo's graphs; Inductor would need a C++ build
    assert_same_logits(model, compiled)
    torch._dynamo.reset()
