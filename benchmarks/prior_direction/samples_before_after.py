import sys, torch, numpy as np, json
ROOT = __import__('os').path.abspath(__file__).rsplit('/benchmarks/', 1)[0]; sys.path[:0] = [ROOT, ROOT + '/examples']
from datasets import load_from_disk
from smpo.sampling import initial_noise, use_deterministic_sampler
from diffusers import StableDiffusionPipeline
from toy.world import true_preference
torch.set_num_threads(1)
D = '/work/toy-full/on-policy-n1-365e9d47fc-36040980ff-1000/pairs-scored'
B = '/work/toy-full/base-36040980ff'
R = '/work/toy-full/runs-on-policy'
ds = load_from_disk(D).select(range(96))
l0 = np.array(ds['label_0']); s0 = np.array(ds['noise_seed_0']); s1 = np.array(ds['noise_seed_1'])
win = np.where(l0 == 1, s0, s1); los = np.where(l0 == 1, s1, s0)
fresh = np.arange(96) + 12345
pipe = StableDiffusionPipeline.from_pretrained(B, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True); use_deterministic_sampler(pipe)
def pref(seeds):
    lat = torch.stack([initial_noise(int(s), (4, 16, 16)) for s in seeds])
    with torch.no_grad():
        im = pipe(prompt=['a disk'] * len(seeds), latents=lat, num_inference_steps=25, guidance_scale=1.0,
                  height=32, width=32, output_type='np').images
    return true_preference(np.asarray(im))[0]
out = {}
base = {k: pref(v) for k, v in (('winner', win), ('loser', los), ('fresh', fresh))}
for run in sys.argv[1:]:
    method, seed, ck = run.split(':')
    pipe.load_lora_weights(f'{R}/{method}/seed-{seed}/{ck}', adapter_name='a')
    new = {k: pref(v) for k, v in (('winner', win), ('loser', los), ('fresh', fresh))}
    pipe.unload_lora_weights()
    out[run] = {k: {'base': round(float(base[k].mean()), 3), 'after': round(float(new[k].mean()), 3),
                    'changed_frac(|d|>0.1)': round(float((np.abs(new[k] - base[k]) > 0.1).mean()), 3),
                    'corr(base,after)': round(float(np.corrcoef(base[k], new[k])[0, 1]), 3)} for k in new}
    print(run, json.dumps(out[run]), flush=True)
