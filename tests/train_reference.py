"""The reference training step: audiocraft 1.3.0's own parts (its RVQ in training mode,
MS-STFT discriminator, adversarial losses, msspec, balancer, Adam, ModuleDictEMA) around
transformers' SEANet, following `CompressionSolver.run_step` line by line.

`make_pair` builds it and encodec-jax's `step.build` from the same initial weights (the codec's
through `EncodecModel.from_state_dict`, the discriminator's through `module_from_state_dict`),
with codebooks already initialised (filled from the model's own residuals) so that neither side
runs k-means, whose random starting vectors cannot match across frameworks (the quantizer's own
tests prove k-means equal with injected vectors).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import torch
from flax import nnx

from encodec_jax import EncodecModel, testing
from encodec_jax.checkpoint import module_from_state_dict
from encodec_jax.train import step as step_module
from encodec_jax.train.config import PRESETS, TrainConfig
from encodec_jax.train.discriminator import MultiScaleSTFTDiscriminator, rename_discriminator_key

from .audiocraft_reference import audiocraft


def tiny_config(**changes) -> TrainConfig:
    """The `tiny` preset, 2 items of 0.25 s (2000 samples at 8 kHz) per batch."""
    config = PRESETS["tiny"]
    return config.replace(data=dataclasses.replace(config.data, batch_size=2), **changes)


class TorchStep:
    """audiocraft's training step around transformers' encoder and decoder."""

    def __init__(self, config: TrainConfig, hf_model, disc, codebooks: dict[str, np.ndarray]):
        core_vq = audiocraft("quantization.core_vq")
        vq = audiocraft("quantization.vq")
        adv = audiocraft("adversarial.losses")
        specloss = audiocraft("losses.specloss")
        balancer = audiocraft("losses.balancer")
        ema = audiocraft("optim.ema")
        del core_vq  # imported for its side effect on vq
        model_config = config.model
        q = config.quantizer
        self.config = config
        self.encoder, self.decoder = hf_model.encoder, hf_model.decoder
        self.frame_rate = model_config.frame_rate
        self.rvq = vq.ResidualVectorQuantizer(
            dimension=model_config.hidden_size,
            n_q=model_config.num_quantizers,
            bins=model_config.codebook_size,
            decay=q.decay,
            kmeans_init=q.kmeans_init,
            kmeans_iters=q.kmeans_iters,
            threshold_ema_dead_code=q.threshold_ema_dead_code,
        )
        with torch.no_grad():
            for i, layer in enumerate(self.rvq.vq.layers):
                book = layer._codebook
                for name in ("embed", "embed_avg", "cluster_size", "inited"):
                    getattr(book, name).copy_(torch.from_numpy(codebooks[name][i]))
        self.modules = torch.nn.ModuleDict(
            {"encoder": self.encoder, "decoder": self.decoder, "quantizer": self.rvq}
        )
        self.modules.train()
        o = config.optim
        self.optimizer = torch.optim.Adam(
            list(self.encoder.parameters()) + list(self.decoder.parameters()),
            lr=o.lr,
            betas=(o.b1, o.b2),
            eps=o.eps,
        )
        self.adversary = adv.AdversarialLoss(
            disc,
            torch.optim.Adam(disc.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps),
            loss=adv.get_adv_criterion("hinge"),
            loss_real=adv.get_real_criterion("hinge"),
            loss_fake=adv.get_fake_criterion("hinge"),
            loss_feat=adv.FeatureMatchingLoss(torch.nn.L1Loss(), normalize=True),
            normalize=True,
        )
        self.l1 = torch.nn.L1Loss()
        # default.yaml's msspec settings (the class's own defaults differ)
        self.msspec = specloss.MultiScaleMelSpectrogramLoss(
            sample_rate=model_config.sampling_rate,
            range_start=6,
            range_end=11,
            n_mels=64,
            f_min=64,
            f_max=None,
            normalized=True,
            alphas=False,
            floor_level=1e-5,
        )
        self.balancer = balancer.Balancer(step_module.balanced_weights(config))
        self.ema = ema.ModuleDictEMA(
            torch.nn.ModuleDict({"model": self.modules}), decay=o.ema_decay
        )

    def step(self, x: np.ndarray) -> dict[str, float]:
        """One `run_step` in training mode on `[B, C, T]` audio; returns the losses."""
        x = torch.from_numpy(x)
        y = x.clone()
        emb = self.encoder(x)
        qres = self.rvq(emb, self.frame_rate)
        y_pred = self.decoder(qres.x)[..., : x.shape[-1]]
        metrics = {"d_loss": float(self.adversary.train_adv(y_pred, y))}
        adv, feat = self.adversary(y_pred, y)
        balanced = {
            step_module.ADV: adv,
            step_module.FEAT: feat,
            "l1": self.l1(y_pred, y),
            "msspec": self.msspec(y_pred, y),
        }
        qres.penalty.backward(retain_graph=True)
        metrics["g_loss"] = float(self.balancer.backward(balanced, y_pred))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.step()
        metrics.update({k: float(v) for k, v in balanced.items()})
        metrics["penalty"] = float(qres.penalty)
        return metrics

    def generator_state(self) -> dict[str, np.ndarray]:
        """The codec's tensors under encodec-jax's names (transformers' weight-norm spelling)."""
        from encodec_jax.checkpoint import rename_hf_key

        out = {}
        for prefix, module in (("encoder.", self.encoder), ("decoder.", self.decoder)):
            for key, value in module.state_dict().items():
                out[rename_hf_key(prefix + key)] = value.detach().numpy().copy()
        for i, layer in enumerate(self.rvq.vq.layers):
            for name in ("embed", "embed_avg", "cluster_size", "inited"):
                out[f"quantizer.layers.{i}.codebook.{name}"] = (
                    getattr(layer._codebook, name).detach().numpy().copy()
                )
        return out

    def disc_state(self) -> dict[str, np.ndarray]:
        return {
            rename_discriminator_key(k): v.detach().numpy().copy()
            for k, v in self.adversary.adversary.state_dict().items()
        }


def make_pair(config: TrainConfig, seed: int = 0):
    """(torch reference step, encodec-jax parts, encodec-jax state) from the same weights."""
    import transformers

    msstftd = audiocraft("adversarial.discriminators.msstftd")
    torch.manual_seed(seed)
    model_config = config.model
    ours = testing.random_model(model_config, seed=seed)
    codebooks = {
        name: np.stack(
            [np.asarray(getattr(layer.codebook, name)[...]) for layer in ours.quantizer.layers]
        )
        for name in ("embed", "cluster_size", "inited")
    }
    codebooks["cluster_size"] = np.full_like(codebooks["cluster_size"], 2.0)
    codebooks["embed_avg"] = codebooks["embed"] * 2.0  # consistent with the counts
    hf = transformers.EncodecModel(transformers.EncodecConfig(**model_config.to_hf_config()))
    state = ours.state_dict(weight_norm="parametrizations")
    hf_state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    hf.load_state_dict(hf_state, strict=False)  # the quantizer's buffers live in the RVQ
    adv = config.adversarial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's legacy weight_norm
        disc = msstftd.MultiScaleSTFTDiscriminator(
            filters=adv.filters,
            n_ffts=list(adv.n_ffts),
            hop_lengths=list(adv.hop_lengths),
            win_lengths=list(adv.win_lengths),
            activation="LeakyReLU",
            activation_params={"negative_slope": 0.3},
        )
    reference = TorchStep(config, hf, disc, codebooks)

    model = EncodecModel.from_state_dict(model_config, ours.state_dict())
    for i, layer in enumerate(model.quantizer.layers):
        for name in ("embed", "embed_avg", "cluster_size", "inited"):
            getattr(layer.codebook, name)[...] = codebooks[name][i]
    parts, train_state = step_module.build(config, model, jax.random.key(seed))
    loaded = module_from_state_dict(
        lambda: MultiScaleSTFTDiscriminator(
            adv.filters,
            n_ffts=adv.n_ffts,
            hop_lengths=adv.hop_lengths,
            win_lengths=adv.win_lengths,
            rngs=nnx.Rngs(0),
        ),
        reference.disc_state(),
        rename_discriminator_key,
    )
    _, disc_params, _ = nnx.split(loaded, nnx.Param, ...)
    train_state = train_state._replace(
        disc_params=disc_params, disc_opt_state=parts.disc_optimizer.init(disc_params)
    )
    return reference, parts, train_state


def jax_generator_state(parts, state) -> dict[str, np.ndarray]:
    model = parts.model(state.params, state.buffers)
    return {k: np.asarray(v) for k, v in model.state_dict().items()}


def jax_disc_state(parts, state) -> dict[str, np.ndarray]:
    from encodec_jax.checkpoint import state_dict_from_module

    return state_dict_from_module(parts.discriminator(state.disc_params))
