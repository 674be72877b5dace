"""Reward-model scoring: one implementation for score_pairs.py, evaluate.py and generate_pairs.py.

A reward model here is a CLIP-like transformers model (PickScore by default, or any ``CLIPModel``)
with ``get_image_features`` / ``get_text_features``. The score of an image for a prompt is the
cosine similarity of their normalised embeddings, WITHOUT the logit scale (x100 gives PickScore's
usual scale), as SmPO's smoothed preferences expect (method notes, section 2).
"""

import torch
import torch.nn.functional as F

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# Reward models that are not CLIP-like transformers models; not built in (see load_reward_model).
NOT_BUILT_IN = {"hpsv2", "hpsv2.1", "imagereward", "aesthetic"}


def default_reward_processor(model_name_or_path):
    """The processor that goes with a reward model: PickScore's is the LAION CLIP-H one."""
    return PICKSCORE_PROCESSOR if model_name_or_path == PICKSCORE else model_name_or_path


def not_built_in(name_or_path):
    """Why ``name_or_path`` cannot be a reward model here, or None."""
    if name_or_path.lower() not in NOT_BUILT_IN:
        return None
    return (f"reward model '{name_or_path}' is not built in: the scripts score with CLIP-like transformers "
            f"models (PickScore: {PICKSCORE}, or any CLIPModel such as openai/clip-vit-large-patch14). "
            "See load_reward_model in smpo/rewards.py for where to add another scorer.")


def load_reward_model(name_or_path, processor_name_or_path=None, device="cpu", cache_dir=None):
    """A CLIP-like reward model (PickScore, CLIP) in fp32 on ``device``, and its processor.

    Raises SystemExit naming the model when it is not built in or cannot be loaded. To add another kind
    of scorer (HPSv2, ImageReward, an aesthetic predictor), give it the interface of ``reward_scores`` and
    dispatch on its name here; keep its package an optional import.
    """
    from transformers import AutoModel, AutoProcessor

    if processor_name_or_path is None:
        processor_name_or_path = default_reward_processor(name_or_path)
    if not_built_in(name_or_path):
        raise SystemExit(not_built_in(name_or_path))
    try:
        model = AutoModel.from_pretrained(name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot load the reward model '{name_or_path}': {err}") from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise SystemExit(f"reward model '{name_or_path}' ({type(model).__name__}) is not CLIP-like: it has no "
                         "get_image_features / get_text_features. Use PickScore or a CLIPModel.")
    try:
        processor = AutoProcessor.from_pretrained(processor_name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot load the reward processor '{processor_name_or_path}' (for reward model "
                         f"'{name_or_path}'; set --reward_processor_name_or_path): {err}") from None
    return model.to(device).eval(), processor


def projected_embedding(output):
    """The projected embedding: transformers 5 returns a ModelOutput whose pooler_output holds it."""
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def reward_scores(model, processor, images, captions, device):
    """Cosine similarity of each image with its caption, shape (B,), float32 on the CPU.

    ``images``: B PIL images; ``captions``: B strings (truncated to 77 tokens). No logit scale.
    """
    dtype = next(model.parameters()).dtype
    image_inputs = processor(images=images, return_tensors="pt")
    text_inputs = processor(text=[str(c) for c in captions], padding=True, truncation=True, max_length=77,
                            return_tensors="pt")
    image_embeds = projected_embedding(model.get_image_features(pixel_values=image_inputs["pixel_values"].to(device, dtype)))
    text_embeds = projected_embedding(model.get_text_features(
        input_ids=text_inputs["input_ids"].to(device), attention_mask=text_inputs["attention_mask"].to(device)))
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    return (image_embeds * text_embeds).sum(dim=-1).cpu()
