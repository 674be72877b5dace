import sys, torch, numpy as np, json
exec(open(__file__.replace('lora_direction', 'residual_direction')).read().split("res = {}")[0])
g = torch.Generator().manual_seed(1)
fwd = torch.randn((N, 4, 16, 16), generator=g).repeat(2, 1, 1, 1)
x0 = x0s['enc_mean']
def deltas(unet_fn, noise):
    out = {}
    for lo, hi in [(0, 50), (50, 200), (200, 400), (400, 700), (700, 1000)]:
        cs = []
        for tt in np.linspace(lo, hi - 1, 3).astype(int):
            a = ac[tt]; xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            cs.append(unet_fn(xt, int(tt)))
        out[f'{lo}-{hi}'] = round(float(np.mean(cs)), 3)
    return out
def rcos(noise):
    def f(xt, tt):
        with torch.no_grad():
            r = pipe.unet(xt, tt, encoder_hidden_states=cond).sample - noise
        return cos((r[N:] - r[:N]).flatten(1), img_dir).mean()
    return f
print('cos(r_l - r_w, x0_w - x0_l), reference, x0 = enc mean: prior', deltas(rcos(eps), eps), 'forward', deltas(rcos(fwd), fwd))
R = '/work/toy-full/runs-on-policy'
for method, noise in (('dpo_prior', eps), ('dpo', fwd)):
    pipe.load_lora_weights(f'{R}/{method}/seed-1/checkpoint-50', adapter_name='a')
    def f(xt, tt):
        with torch.no_grad():
            on = pipe.unet(xt, tt, encoder_hidden_states=cond).sample
            pipe.unet.disable_adapters(); off = pipe.unet(xt, tt, encoder_hidden_states=cond).sample; pipe.unet.enable_adapters()
        dl = (on - off)
        return cos((dl[:N] + dl[N:]).flatten(1), img_dir).mean()
    print(method, 'seed-1 ckpt-50: cos(eps_lora - eps_ref (winner+loser), x0_w - x0_l) at its own noise:', deltas(f, noise))
    pipe.unload_lora_weights()
