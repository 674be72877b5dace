import sys, torch, numpy as np, json
ROOT = __import__('os').path.abspath(__file__).rsplit('/benchmarks/', 1)[0]; sys.path[:0] = [ROOT, ROOT + '/examples']
from datasets import load_from_disk
from smpo.data import PairTransform, PreferenceCollator
from smpo.noise_sources import NOISE_SOURCES
from smpo.sampling import initial_noise, use_deterministic_sampler
from smpo.setup import load_noise_schedule
from smpo.step import Models
from types import SimpleNamespace
from diffusers import StableDiffusionPipeline
from toy.world import true_preference
torch.set_num_threads(1); torch.manual_seed(0)
D = '/work/toy-full/on-policy-n1-365e9d47fc-36040980ff-1000/pairs-scored'
B = '/work/toy-full/base-36040980ff'
ds = load_from_disk(D)
rows = list(range(8))
ex = [{**ds[r], 'row': r} for r in rows]
b = PreferenceCollator(PairTransform(32, False, hflip=False), 'human')(ex)
pipe = StableDiffusionPipeline.from_pretrained(B, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True); use_deterministic_sampler(pipe)
process = load_noise_schedule(SimpleNamespace(pretrained_model_name_or_path=B, revision=None))
seeds = b['noise_seeds']
n = len(seeds)
t = torch.full((n,), 500)
lat = torch.zeros(n, 4, 16, 16)
noisy, noise = NOISE_SOURCES['prior'].make(None, Models(None, None, None, None, process), lat, t, None, None, n // 2,
                                          noise_seeds=seeds, noise_shapes=b['noise_shapes'])
ref = torch.stack([initial_noise(s, (4, 16, 16)) for s in seeds.tolist()])
print('1a noise == initial_noise(seed):', torch.equal(noise, ref))
# regenerate with the sampler, keep final latent
out = pipe(prompt=['a disk'] * n, latents=ref.clone(), num_inference_steps=25, guidance_scale=1.0, height=32, width=32,
           output_type='latent')
zs = out.images
img = pipe.vae.decode(zs / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
px = b['pixel_values']
print('1b max |regenerated pixels - batch pixels| (0-255 scale):', float(((img - px).abs() * 127.5).max()))
print('   winners-first labels ok: true_pref of batch winners/losers:',
      np.round(true_preference(((px.permute(0, 2, 3, 1) + 1) / 2).numpy())[0], 2).tolist())
with torch.no_grad():
    post = pipe.vae.encode(px).latent_dist
sf = pipe.vae.config.scaling_factor
mean, samp = post.mean * sf, post.sample() * sf
print('1c RMS sampler final latent vs enc mean %.3f vs enc sample %.3f; posterior std*sf mean %.3f; latent rms %.3f' % (
    (zs - mean).pow(2).mean().sqrt(), (zs - samp).pow(2).mean().sqrt(), (post.std * sf).mean(), zs.pow(2).mean().sqrt()))
# 2. reference error per t bucket, prior-noised latents from means vs samples vs sampler x0
ac = process.alphas_cumprod
cond = pipe.encode_prompt('a disk', 'cpu', 1, False)[0].repeat(n, 1, 1)
res = {}
for lo, hi in [(0, 50), (50, 200), (200, 400), (400, 700), (700, 1000)]:
    row = {}
    for name, x0 in [('sampler_x0', zs), ('enc_mean', mean), ('enc_sample', samp)]:
        errs = []
        for tt in np.linspace(lo, hi - 1, 4).astype(int):
            a = ac[tt]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * ref
            with torch.no_grad():
                e = pipe.unet(xt, tt, encoder_hidden_states=cond).sample
            errs.append(float((e - ref).pow(2).mean()))
        row[name] = round(float(np.mean(errs)), 4)
    res[f'{lo}-{hi}'] = row
print('2 ref MSE vs eps_prior:', json.dumps(res))
