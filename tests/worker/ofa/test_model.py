"""Our runtime against ModelScope's reference OFA code, on random checkpoints.

Both load the same checkpoint files; encoder outputs and answer log-probabilities
must agree to 1e-4 (fp32) on real photographs and varied texts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import reference as R
from tests.helpers import photo
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

CASES = [
    ("astronaut", "A woman in a space suit smiles.", None),
    ("chelsea", "two dogs play frisbee on the beach -- sunny/windy!!", None),
    ("coffee", "There is a cup of coffee.", "A photo taken in a cafe."),
    ("rocket", "  ...the ROCKET is on the launch-pad  ", "It is daytime. <person> watches."),
    ("camera", "a man holds a camera", None),  # grayscale source image
]
TOL = 1e-4


def reference_traverse(ref, sample, answer_ids: list[list[int]], trie_allowed, eos: int):
    """ModelScope's ``_traverse_inference`` for one item, written out: every answer plus
    eos teacher-forced after the decoder prompt, logits outside the trie masked to -inf,
    log-softmax over the whole vocabulary, summed over the answer positions."""
    with torch.no_grad():
        enc = ref.encoder(
            input_ids=sample["source"][None],
            patch_images=sample["patch_image"][None],
            patch_masks=torch.tensor([True]),
        )
        prompt = sample["decoder_prompt"]
        scores = []
        for ids in answer_ids:
            prev = torch.cat([prompt, torch.tensor(ids)])[None]
            out = ref.decoder(
                prev,
                encoder_hidden_states=enc.last_hidden_state,
                encoder_attention_mask=R.expand_mask(
                    enc.padding_mask, enc.last_hidden_state.dtype, prev.shape[-1]
                ),
                src_pos_embed=enc.position_embedding,
            )
            logits = out[0][0]
            total = 0.0
            full = [*ids, eos]
            for k, target in enumerate(full):
                row = logits[len(prompt) - 1 + k]
                masked = torch.full_like(row, -math.inf)
                allowed = sorted(trie_allowed(ids[:k]))
                masked[allowed] = row[allowed]
                total += torch.log_softmax(masked.float(), -1)[target].item()
            scores.append(total)
    return enc, scores


@pytest.fixture(scope="module", params=["tiny_dir", "other_dir", "multi_dir"])
def pair(request):
    path: Path = request.getfixturevalue(request.param)
    ref = R.load_reference_model(path)
    pre = R.reference_preprocessor(path)
    ours = Entailer(load_checkpoint(path), device="cpu")
    return path, ref, pre, ours


@pytest.mark.slow
@pytest.mark.parametrize("image,text,premise", CASES)
def test_encoder_and_answer_scores_match_reference(pair, image, text, premise):
    _, ref, pre, ours = pair
    img = photo(image)
    data = (
        {"image": img, "text": text}
        if premise is None
        else {
            "image": img,
            "text": text,
            "text2": premise,
        }
    )
    sample = pre(data)
    mine = ours.prepare(img, text, premise)
    assert mine.source == sample["source"].tolist()
    assert mine.prompt == sample["decoder_prompt"].tolist()
    # Resized to uint8 on the CPU, normalised on the device: the reference's exact floats.
    np.testing.assert_array_equal(ours.pixels([mine])[0].numpy(), sample["patch_image"].numpy())

    answer_ids = [list(t) for t in ours.answers.tokens]
    enc, ref_scores = reference_traverse(ref, sample, answer_ids, ours.answers.allowed, 2)
    our_enc = ours.encode([mine])
    diff = (enc.last_hidden_state - our_enc.hidden).abs().max().item()
    assert diff <= TOL, diff
    assert enc.last_hidden_state.shape == our_enc.hidden.shape
    our_scores = ours.answer_log_probs([mine])[0].tolist()
    assert our_scores == pytest.approx(ref_scores, abs=TOL)
    # The verdict is the reference's argmax and softmax.
    verdict = ours.score([mine])[0]
    ref_probs = torch.softmax(torch.tensor(ref_scores, dtype=torch.float64), -1)
    best = int(ref_probs.argmax())
    assert verdict.answer == ours.answers.names[best]
    assert sum(verdict.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert max(verdict.probabilities.values()) == pytest.approx(ref_probs[best].item(), abs=TOL)


@pytest.mark.slow
def test_batch_equals_one_at_a_time(pair):
    """Padding in a batch changes nothing: each item equals scoring it alone (1e-5)."""
    _, _, _, ours = pair
    items = [ours.prepare(photo(name), text, premise) for name, text, premise in CASES]
    alone = torch.stack([ours.answer_log_probs([item])[0] for item in items])
    # The padded batch path (what an accelerator runs; the CPU scores item by item).
    padded = ours._answer_log_probs(items)
    assert (alone - padded).abs().max().item() <= 1e-5
    assert (alone - ours.answer_log_probs(items)).abs().max().item() <= 1e-5
    lengths = {len(item.source) for item in items}
    assert len(lengths) > 1  # the batch really was padded


def test_exif_orientation_applied_like_reference(tiny_dir: Path, tmp_path: Path):
    """A JPEG whose EXIF says 'rotate' reaches the network upright, as ModelScope's
    image loader (``LoadImage``: exif_transpose then RGB) delivers it."""
    from modelscope.preprocessors.image import load_image

    img = photo("astronaut").resize((64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    ours = Entailer(load_checkpoint(tiny_dir), device="cpu")
    pre = R.reference_preprocessor(tiny_dir)
    reference = pre({"image": load_image(str(path)), "text": "a person"})["patch_image"]
    mine = ours.pixels([ours.prepare(path.read_bytes(), "a person")])[0].numpy()
    np.testing.assert_array_equal(mine, reference.numpy())
    unrotated = ours.pixels([ours.prepare(img, "a person")])[0].numpy()
    assert not np.array_equal(mine, unrotated)
