"""FixMatch and UniMatch pinned: their losses and gradient checksums over 3 steps on a fixed
seed and batch, recorded from the code before the base + add-on refactor (issue 38), so that
the refactor (and any later change) keeps the committed ``fixmatch`` / ``unimatch`` results
reproducible. The tolerance (relative 1e-5) only absorbs thread-count reduction order; the
refactor itself was checked bit for bit."""

import pytest
import torch

from .method_steps import grad_sq, run_steps

# name -> (method, params, arch, teacher kind)
CASES = {
    'fixmatch_tiny_ce': ('fixmatch', {'threshold': 0.4}, 'tiny', 'self'),
    'fixmatch_unet_dice': ('fixmatch', {'threshold': 0.4, 'labeled_loss': 'ce_dice', 'unlabeled_loss': 'dice', 'weight_u': 0.5}, 'unet2d', 'self'),
    'fixmatch_tiny_ema': ('fixmatch', {'threshold': 0.4}, 'tiny', 'ema'),
    'unimatch_tiny_ce': ('unimatch', {'threshold': 0.4}, 'tiny', 'self'),
    'unimatch_unet_dice': ('unimatch', {'threshold': 0.4, 'labeled_loss': 'ce_dice', 'unlabeled_loss': 'dice'}, 'unet2d', 'self'),
    'unimatch_tiny_ema': ('unimatch', {'threshold': 0.4}, 'tiny', 'ema'),
    'unimatch_unet_one_view': ('unimatch', {'threshold': 0.4, 'labeled_loss': 'ce_dice', 'unlabeled_loss': 'dice', 'strong_views': 1, 'weight_s': 0.25}, 'unet2d', 'self'),
}

# per step: the logged losses and the sum of the squared student gradients
PINNED = {
    'fixmatch_tiny_ce': [
        ({'loss': 0.8080030679702759, 'loss_x': 0.9178380370140076, 'loss_s': 0.6981680393218994}, 1.1231392893087269),
        ({'loss': 0.8267788887023926, 'loss_x': 0.9460208415985107, 'loss_s': 0.7075368762016296}, 0.8028856855562874),
        ({'loss': 0.7741812467575073, 'loss_x': 0.8693447113037109, 'loss_s': 0.6790177822113037}, 0.8649788251352543),
    ],
    'fixmatch_unet_dice': [
        ({'loss': 0.5793706774711609, 'loss_x': 0.911702036857605, 'loss_s': 0.4940786361694336}, 0.2056657111772847),
        ({'loss': 0.5616599321365356, 'loss_x': 0.8801182508468628, 'loss_s': 0.48640313744544983}, 0.17786196829012357),
        ({'loss': 0.5487239360809326, 'loss_x': 0.8541078567504883, 'loss_s': 0.48667991161346436}, 0.15114057581222717),
    ],
    'fixmatch_tiny_ema': [
        ({'loss': 0.8662938475608826, 'loss_x': 0.910777747631073, 'loss_s': 0.8218099474906921}, 0.9611094846799374),
        ({'loss': 0.8607669472694397, 'loss_x': 0.9451910257339478, 'loss_s': 0.7763428688049316}, 0.9763267219708771),
        ({'loss': 0.7871448993682861, 'loss_x': 0.8761273622512817, 'loss_s': 0.6981624960899353}, 0.9391417472171435),
    ],
    'unimatch_tiny_ce': [
        ({'loss': 0.8020026683807373, 'loss_x': 0.9178380370140076, 'loss_s': 0.6944742202758789, 'loss_fp': 0.6778603196144104}, 0.9488067055421838),
        ({'loss': 0.8197660446166992, 'loss_x': 0.9463381767272949, 'loss_s': 0.7101189494132996, 'loss_fp': 0.6762688159942627}, 0.905555818739448),
        ({'loss': 0.7729254364967346, 'loss_x': 0.8681885004043579, 'loss_s': 0.6840547323226929, 'loss_fp': 0.6712701320648193}, 0.8028182564906235),
    ],
    'unimatch_unet_dice': [
        ({'loss': 0.7003311514854431, 'loss_x': 0.911702036857605, 'loss_s': 0.4881397485733032, 'loss_fp': 0.48978057503700256}, 0.20662278493833897),
        ({'loss': 0.6857139468193054, 'loss_x': 0.8826809525489807, 'loss_s': 0.4951210618019104, 'loss_fp': 0.4823726713657379}, 0.15671621294544597),
        ({'loss': 0.6681350469589233, 'loss_x': 0.8591322898864746, 'loss_s': 0.47945040464401245, 'loss_fp': 0.4748252332210541}, 0.17900518226123358),
    ],
    'unimatch_tiny_ema': [
        ({'loss': 0.8638384938240051, 'loss_x': 0.910777747631073, 'loss_s': 0.8198670148849487, 'loss_fp': 0.813931405544281}, 0.9600697567282841),
        ({'loss': 0.859539270401001, 'loss_x': 0.9442306756973267, 'loss_s': 0.775494396686554, 'loss_fp': 0.7742012739181519}, 1.0766699551669745),
        ({'loss': 0.7807767391204834, 'loss_x': 0.8635529279708862, 'loss_s': 0.6981788873672485, 'loss_fp': 0.6978221535682678}, 0.8037167780135157),
    ],
    'unimatch_unet_one_view': [
        ({'loss': 0.7014791965484619, 'loss_x': 0.911702036857605, 'loss_s': 0.49273204803466797, 'loss_fp': 0.48978057503700256}, 0.2091890105931445),
        ({'loss': 0.6878755688667297, 'loss_x': 0.8833807706832886, 'loss_s': 0.47981032729148865, 'loss_fp': 0.5049305558204651}, 0.1730592397942543),
        ({'loss': 0.6813910603523254, 'loss_x': 0.8602463006973267, 'loss_s': 0.4969610869884491, 'loss_fp': 0.5081104636192322}, 0.17485880161624356),
    ],
}

@pytest.mark.parametrize("case", sorted(CASES))
def test_base_losses_and_gradients_are_pinned(case):
    torch.set_num_threads(1)
    name, params, arch, teacher = CASES[case]
    records = run_steps(name, params, arch=arch, teacher_kind=teacher)
    for step, (rec, (losses, gsq)) in enumerate(zip(records, PINNED[case])):
        assert set(rec["losses"]) == set(losses), (case, step)
        for k, v in losses.items():
            assert rec["losses"][k].item() == pytest.approx(v, rel=1e-5, abs=1e-7), (case, step, k)
        assert grad_sq(rec) == pytest.approx(gsq, rel=1e-5), (case, step)
        assert torch.allclose(sum(rec["terms"].values()), rec["losses"]["loss"], rtol=1e-6, atol=1e-7)
