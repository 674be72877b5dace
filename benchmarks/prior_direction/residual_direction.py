import sys, torch, numpy as np, json
ROOT = __import__('os').path.abspath(__file__).rsplit('/benchmarks/', 1)[0]; sys.path[:0] = [ROOT, ROOT + '/examples']
from datasets import load_from_disk
from smpo.data import PairTransform, PreferenceCollator
from smpo.sampling import initial_noise, use_deterministic_sampler
from diffusers import StableDiffusionPipeline
torch.set_num_threads(1); torch.manual_seed(0)
D = '/work/toy-full/on-policy-n1-365e9d47fc-36040980ff-1000/pairs-scored'
B = '/work/toy-full/base-36040980ff'
ds = load_from_disk(D)
N = 48
b = PreferenceCollator(PairTransform(32, False, hflip=False), 'human')([{**ds[r], 'row': r} for r in range(N)])
pipe = StableDiffusionPipeline.from_pretrained(B, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True); use_deterministic_sampler(pipe)
ac = pipe.scheduler.alphas_cumprod
eps = torch.stack([initial_noise(s, (4, 16, 16)) for s in b['noise_seeds'].tolist()])
with torch.no_grad():
    zs = pipe(prompt=['a disk'] * 2 * N, latents=eps.clone(), num_inference_steps=25, guidance_scale=1.0,
              height=32, width=32, output_type='latent').images
    post = pipe.vae.encode(b['pixel_values']).latent_dist
sf = pipe.vae.config.scaling_factor
x0s = {'sampler_x0': zs, 'enc_mean': post.mean * sf, 'enc_sample': post.sample() * sf}
cond = pipe.encode_prompt('a disk', 'cpu', 1, False)[0].repeat(2 * N, 1, 1)
img_dir = (zs[:N] - zs[N:]).flatten(1)  # winner - loser, sampler latents
cos = lambda a, c: torch.nn.functional.cosine_similarity(a, c, dim=1)
res = {}
for lo, hi in [(0, 50), (50, 200), (200, 400), (400, 700), (700, 1000)]:
    row = {}
    for name, x0 in x0s.items():
        cs, mag = [], []
        for tt in np.linspace(lo, hi - 1, 3).astype(int):
            a = ac[tt]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            with torch.no_grad():
                r = pipe.unet(xt, int(tt), encoder_hidden_states=cond).sample - eps
            d = (r[N:] - r[:N]).flatten(1)  # r_l - r_w
            cs.append(float(cos(d, img_dir).mean())); mag.append(float(d.pow(2).mean()))
        row[name] = {'cos(r_l-r_w, x0_w-x0_l)': round(np.mean(cs), 3), 'ms(r_l-r_w)': round(np.mean(mag), 4)}
    res[f'{lo}-{hi}'] = row
print(json.dumps(res, indent=0))
# the round trip: does it pull a pair's latents together (a contraction)?
for name in ('enc_mean', 'enc_sample'):
    e = (x0s[name] - zs)
    print(name, 'cos((e_l - e_w), x0_w - x0_l) = %.3f' % float(cos((e[N:] - e[:N]).flatten(1), img_dir).mean()))
