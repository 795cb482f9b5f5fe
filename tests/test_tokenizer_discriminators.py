"""Stage-2 tokenizer training pieces: spectral normalisation against numpy, the discriminators'
shapes and STFT, the GAN losses on hand-computed cases, the crop check, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax.tokenizer.discriminators import (
    DiscriminatorConfig,
    DiscriminatorOutput,
    Discriminators,
    MPDConfig,
    STFTDConfig,
    check_fits,
    period_view,
    stft,
    stft_window,
)
from mimo_jax.tokenizer.gan_losses import (
    GanLossConfig,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
    generator_loss,
    split_real_fake,
)
from mimo_jax.tokenizer.spectral_norm import (
    SNConv,
    SNDense,
    SpectralNorm,
    SpectralVector,
    weight_matrix,
)

# Small enough to compile in a few seconds: two periods, two STFT scales, thin layers.
SMALL = DiscriminatorConfig(
    MPDConfig(periods=(2, 3), channels=(4, 4), strides=(3, 1)),
    STFTDConfig(
        n_ffts=(128, 256),
        hop_lengths=(32, 64),
        win_lengths=(128, 256),
        filters=4,
        max_filters=4,
        dilations=(1, 2),
    ),
)


def _normalize(x):
    return x / max(np.linalg.norm(x), 1e-12)


def _kernel_with_singular_values(singular, out, k, cin, seed=0):
    """A 1-D conv kernel [k, in, out] whose PyTorch matrix [out, in * k] has these singular
    values (built without the code under test: PyTorch's weight [out, in, k] -> ours)."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.normal(size=(out, out)))
    right, _ = np.linalg.qr(rng.normal(size=(cin * k, out)))
    torch_weight = (left * singular) @ right.T  # [out, in * k]
    return torch_weight.reshape(out, cin, k).transpose(2, 1, 0).astype(np.float32)


def test_weight_matrix_is_pytorchs_out_by_rest():
    kernel = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # [kh, kw, in, out]
    torch_weight = kernel.transpose(3, 2, 0, 1)  # [out, in, kh, kw]
    np.testing.assert_array_equal(weight_matrix(jnp.asarray(kernel)), torch_weight.reshape(5, -1))
    dense = np.arange(12, dtype=np.float32).reshape(3, 4)  # [in, out]
    np.testing.assert_array_equal(weight_matrix(jnp.asarray(dense)), dense.T)


def test_power_iteration_converges_to_the_top_singular_value():
    singular = np.array([3.0, 2.7, 1.0, 0.5, 0.1])
    kernel = jnp.asarray(_kernel_with_singular_values(singular, out=5, k=3, cin=4))
    start = _normalize(np.random.default_rng(1).normal(size=5))
    norm = SpectralNorm(jnp.asarray(start, jnp.float32), jnp.zeros(12))
    step = nnx.jit(lambda n, w: (n(w), n.sigma(w)))
    _, sigma_after_2 = step(norm, kernel)
    assert abs(float(sigma_after_2) - 3.0) > 1e-3  # 2 steps from a random start: not there yet
    for _ in range(60):
        normalised, sigma = step(norm, kernel)
    assert float(sigma) == pytest.approx(3.0, abs=1e-3)
    top = np.linalg.svd(np.asarray(weight_matrix(normalised)), compute_uv=False)[0]
    assert top == pytest.approx(1.0, abs=1e-3)


def test_one_training_step_equals_numpy():
    layer = SNConv(2, 3, (3, 2), rngs=nnx.Rngs(0))
    kernel = np.asarray(layer.kernel[...], np.float64)
    u0 = np.asarray(layer.spectral.u[...], np.float64)
    matrix = kernel.transpose(3, 2, 0, 1).reshape(3, -1)
    v = _normalize(matrix.T @ u0)
    u = _normalize(matrix @ v)
    sigma = u @ matrix @ v
    weight = layer.weight()
    np.testing.assert_allclose(layer.spectral.u[...], u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.spectral.v[...], v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weight, kernel / sigma, rtol=1e-5, atol=1e-6)


def test_vectors_update_in_training_only():
    layer = SNDense(4, 3, axes=("embed", "mlp"), rngs=nnx.Rngs(1))
    layer.spectral.u[...] = jnp.array([1.0, 0.0, 0.0])  # far from converged, so a step moves it
    layer.eval()
    u, v = np.asarray(layer.spectral.u[...]), np.asarray(layer.spectral.v[...])
    first, second = np.asarray(layer.weight()), np.asarray(layer.weight())
    np.testing.assert_array_equal(layer.spectral.u[...], u)
    np.testing.assert_array_equal(layer.spectral.v[...], v)
    np.testing.assert_array_equal(first, second)
    kernel = np.asarray(layer.kernel[...], np.float64)
    np.testing.assert_allclose(first, kernel / (u @ kernel.T @ v), rtol=1e-5)
    layer.train()
    layer.weight()
    assert not np.allclose(layer.spectral.u[...], u, atol=1e-3)
    assert not np.allclose(layer.spectral.v[...], v, atol=1e-3)


def test_vectors_are_state_not_params():
    layer = SNConv(2, 3, (3,), rngs=nnx.Rngs(0))
    assert isinstance(layer.spectral.u, SpectralVector)
    assert not isinstance(layer.spectral.u, nnx.Param)
    params = nnx.to_flat_state(nnx.state(layer, nnx.Param))
    assert sorted(path for path, _ in params) == [("bias",), ("kernel",)]
    vectors = nnx.to_flat_state(nnx.state(layer, SpectralVector))
    assert sorted(path for path, _ in vectors) == [("spectral", "u"), ("spectral", "v")]


def test_gradient_goes_through_the_kernel_only():
    # PyTorch: u and v are constants to autodiff, so for L = Σ G ⊙ K / σ with σ = uᵀ Kᵀ v
    # (K [in, out]), dL/dK = G / σ - (Σ G ⊙ K) / σ² · v uᵀ with this step's u and v.
    layer = SNDense(4, 3, axes=("embed", "mlp"), rngs=nnx.Rngs(2))
    layer.spectral.u[...] = jnp.array([0.6, 0.8, 0.0])  # far from converged: u, v move
    g = np.random.default_rng(0).normal(size=(4, 3))
    grads = nnx.grad(lambda m: jnp.sum(jnp.asarray(g, jnp.float32) * m.weight()))(layer)
    kernel = np.asarray(layer.kernel[...], np.float64)
    u, v = np.asarray(layer.spectral.u[...], np.float64), np.asarray(layer.spectral.v[...])
    sigma = u @ kernel.T @ v
    expected = g / sigma - np.sum(g * kernel) / sigma**2 * np.outer(v, u)
    np.testing.assert_allclose(grads["kernel"][...], expected, rtol=1e-4, atol=1e-6)


def _conv2d_reference(x, kernel, stride, dilation, padding):
    """Direct 2-D convolution in numpy: x [H, W, in], kernel [kh, kw, in, out]."""
    x = np.pad(x, ((padding[0],) * 2, (padding[1],) * 2, (0, 0)))
    kh, kw = kernel.shape[:2]
    span = [(kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1]
    rows = (x.shape[0] - span[0]) // stride[0] + 1
    cols = (x.shape[1] - span[1]) // stride[1] + 1
    out = np.zeros((rows, cols, kernel.shape[-1]))
    for i in range(rows):
        for j in range(cols):
            r, c = i * stride[0], j * stride[1]
            patch = x[r : r + span[0] : dilation[0], c : c + span[1] : dilation[1]]
            out[i, j] = np.einsum("hwi,hwio->o", patch, kernel)
    return out


def test_conv_matches_a_direct_convolution():
    layer = SNConv(2, 3, (3, 5), stride=(1, 2), dilation=(2, 1), padding=(2, 2), rngs=nnx.Rngs(0))
    layer.eval()
    x = np.random.default_rng(0).normal(size=(7, 9, 2)).astype(np.float32)
    weight = np.asarray(layer.weight(), np.float64)
    expected = _conv2d_reference(x, weight, (1, 2), (2, 1), (2, 2)) + layer.bias[...]
    np.testing.assert_allclose(layer(jnp.asarray(x[None]))[0], expected, rtol=1e-4, atol=1e-5)


def test_period_view_reflects_the_end():
    wav = jnp.arange(10.0).reshape(2, 5)
    np.testing.assert_array_equal(
        period_view(wav, 3)[..., 0],
        [[[0, 1, 2], [3, 4, 3]], [[5, 6, 7], [8, 9, 8]]],
    )


def test_stft_matches_a_direct_numpy_stft():
    # torch.stft(center=False) with a periodic Hann window of 96 centred in 128, divided by the
    # window's L2 norm (torchaudio's normalized=True).
    n_fft, hop, win = 128, 48, 96
    wav = np.random.default_rng(0).normal(size=(2, 700))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    window = np.zeros(n_fft)
    window[16:112] = hann
    frames = np.stack([wav[:, t * hop : t * hop + n_fft] for t in range(1 + (700 - n_fft) // hop)])
    expected = np.fft.rfft(frames * window, axis=-1).transpose(1, 0, 2) / np.sqrt(np.sum(hann**2))
    np.testing.assert_allclose(stft_window(n_fft, win), window, atol=1e-7)
    spec = stft(jnp.asarray(wav, jnp.float32), n_fft, hop, jnp.asarray(window), normalized=True)
    assert spec.shape == (2, 12, 65)
    np.testing.assert_allclose(spec, expected, rtol=1e-4, atol=1e-4)


def _leaky(x, slope):
    return np.where(x > 0, x, slope * x)


def _stack_reference(x, convs, geometry, slope):
    """Features and flattened logits of a conv stack in numpy, each layer's (stride, dilation,
    padding) written out from the config by hand; weights taken from the modules (eval mode)."""
    features = []
    for i, (conv, (stride, dilation, padding)) in enumerate(zip(convs, geometry)):
        weight = np.asarray(conv.weight(), np.float64)
        x = _conv2d_reference(x, weight, stride, dilation, padding) + np.asarray(conv.bias[...])
        x = _leaky(x, slope) if i < len(convs) - 1 else x
        features.append(x)
    return features


def test_period_discriminator_matches_numpy():
    model = Discriminators(SMALL, rngs=nnx.Rngs(4))
    model.eval()
    period = model.mpd.discriminators[1]  # p = 3; convs (5, 1) strides 3 and 1, post (3, 1)
    wav = np.random.default_rng(0).normal(size=(1, 100)).astype(np.float32)
    out = nnx.jit(lambda d, x: d(x))(period, jnp.asarray(wav))
    padded = np.concatenate([wav[0], wav[0, -3:-1][::-1]])  # 100 -> 102 samples, reflected
    geometry = [((3, 1), (1, 1), (2, 0)), ((1, 1), (1, 1), (2, 0)), ((1, 1), (1, 1), (1, 0))]
    expected = _stack_reference(
        padded.reshape(34, 3, 1), [*period.convs, period.post], geometry, 0.1
    )
    assert len(out.features) == 3  # HiFi-GAN: the output conv's map is a feature too
    for got, want in zip(out.features, expected):
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.logits[0], expected[-1].reshape(-1), rtol=1e-4, atol=1e-5)


def test_stft_discriminator_matches_numpy():
    model = Discriminators(SMALL, rngs=nnx.Rngs(5))
    model.eval()
    scale = model.stft.discriminators[0]  # n_fft 128, hop 32; kernel (3, 9), dilations 1, 2
    wav = np.random.default_rng(1).normal(size=(1, 256)).astype(np.float32)
    out = nnx.jit(lambda d, x: d(x))(scale, jnp.asarray(wav))
    spec = np.asarray(stft(jnp.asarray(wav), 128, 32, stft_window(128, 128), True))[0]
    x = np.stack([spec.real, spec.imag], axis=-1)  # [5 frames, 65 bins, 2]
    geometry = [
        ((1, 1), (1, 1), (1, 4)),
        ((1, 2), (1, 1), (1, 4)),
        ((1, 2), (2, 1), (2, 4)),
        ((1, 1), (1, 1), (1, 1)),
        ((1, 1), (1, 1), (1, 1)),
    ]
    expected = _stack_reference(x, [*scale.convs, scale.post], geometry, 0.2)
    assert len(out.features) == 4  # EnCodec: the output conv's map is not a feature
    for got, want in zip(out.features, expected):
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.logits[0], expected[-1].reshape(-1), rtol=1e-4, atol=1e-5)


# The default periods and STFT scales with 4 channels per layer (shapes only, nothing compiled).
NARROW = DiscriminatorConfig(MPDConfig(channels=(4,) * 5), STFTDConfig(filters=4, max_filters=4))


def test_output_shapes_and_feature_counts():
    crop = 3000
    model = nnx.eval_shape(lambda: Discriminators(NARROW, rngs=nnx.Rngs(0)))
    outputs = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, crop), jnp.float32))
    assert len(outputs) == 5 + 3
    # MPD: ceil(3000 / p) rows (3003 samples after reflection for p = 7, 11), then ceil(rows / 3)
    # four times: 1500 -> 500 -> 167 -> 56 -> 19 for p = 2, ...; logits rows * p.
    first_rows = {2: 500, 3: 334, 5: 200, 7: 143, 11: 91}
    last_rows = {2: 19, 3: 13, 5: 8, 7: 6, 11: 4}
    for period, out in zip((2, 3, 5, 7, 11), outputs[:5]):
        assert out.logits.shape == (2, last_rows[period] * period)
        assert len(out.features) == 6
        assert out.features[0].shape == (2, first_rows[period], period, 4)
        assert out.features[-1].shape == (2, last_rows[period], period, 1)
    # STFT: 1 + (3000 - n_fft) // hop frames; n_fft / 2 + 1 bins halved (rounding up) three times.
    stft_shapes = [(8, 65), (2, 129), (20, 33)]
    for (frames, bins), out in zip(stft_shapes, outputs[5:]):
        assert out.logits.shape == (2, frames * bins)
        assert len(out.features) == 5
        assert out.features[-1].shape == (2, frames, bins, 4)


def test_hinge_losses_by_hand():
    real = [jnp.array([[0.5, 2.0]]), jnp.array([[-1.0]])]
    fake = [jnp.array([[-2.0, 0.0]]), jnp.array([[3.0]])]
    # k=0: real (0.5 + 0) / 2 = 0.25, fake (0 + 1) / 2 = 0.5; k=1: real 2, fake 4 -> (0.75 + 6) / 2
    assert float(discriminator_hinge_loss(real, fake)) == pytest.approx(3.375)
    # k=0: (3 + 1) / 2 = 2; k=1: relu(1 - 3) = 0 -> (2 + 0) / 2
    assert float(generator_hinge_loss(fake)) == pytest.approx(1.0)


def test_feature_matching_by_hand():
    real = [
        [jnp.array([1.0, 2.0]), jnp.array([[0.0]])],
        [jnp.array([1.0, 1.0, 1.0, 1.0])],
    ]
    fake = [
        [jnp.array([1.0, 4.0]), jnp.array([[-3.0]])],
        [jnp.array([0.0, 0.0, 0.0, 2.0])],
    ]
    # k=0: layers (0 + 2) / 2 = 1 and 3 -> 2; k=1: 4 / 4 = 1 -> (2 + 1) / 2 (not (1 + 3 + 1) / 3).
    assert float(feature_matching_loss(real, fake)) == pytest.approx(1.5)


def test_generator_total_by_hand():
    both = [
        DiscriminatorOutput(jnp.array([[5.0], [0.5]]), (jnp.array([[1.0], [3.0]]),)),
        DiscriminatorOutput(jnp.array([[5.0], [-1.0]]), (jnp.array([[2.0], [2.0]]),)),
    ]
    real, fake = split_real_fake(both, 1)
    np.testing.assert_array_equal(real[0].logits, [[5.0]])
    np.testing.assert_array_equal(fake[1].features[0], [[2.0]])
    total, metrics = generator_loss(jnp.float32(0.25), real, fake, GanLossConfig())
    # adversarial (0.5 + 2) / 2 = 1.25; feature matching (2 + 0) / 2 = 1; 0.25 + 1.25 + 2 * 1
    assert float(metrics["adversarial"]) == pytest.approx(1.25)
    assert float(metrics["feature_matching"]) == pytest.approx(1.0)
    assert float(total) == pytest.approx(3.5)


def test_crop_shorter_than_the_largest_window_is_one_clear_error():
    with pytest.raises(ValueError, match="2000 samples are shorter than .* n_fft 2048") as err:
        check_fits(DiscriminatorConfig(), 2000)
    assert "\n" not in str(err.value)
    small_fft = DiscriminatorConfig(
        MPDConfig(periods=(2, 64)), STFTDConfig(n_ffts=(32,), hop_lengths=(8,), win_lengths=(32,))
    )
    with pytest.raises(ValueError, match="50 samples are shorter than .* largest period 64"):
        check_fits(small_fft, 50)
    check_fits(small_fft, 64)
    model = nnx.eval_shape(lambda: Discriminators(NARROW, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="n_fft 2048"):
        nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 1024), jnp.float32))


def test_inconsistent_configs_are_refused():
    with pytest.raises(ValueError, match="win_length 600 > n_fft 512"):
        STFTDConfig(n_ffts=(512,), hop_lengths=(128,), win_lengths=(600,))
    with pytest.raises(ValueError, match="one stride per conv"):
        MPDConfig(channels=(4, 4), strides=(3,))
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 8\): expected odd"):
        STFTDConfig(kernel_size=(3, 8))


def test_gradients_reach_every_discriminator_parameter():
    model = Discriminators(SMALL, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 2)
    real = jax.random.normal(keys[0], (2, 600))
    fake = 0.5 * jax.random.normal(keys[1], (2, 600))
    spectral = model.stft.discriminators[1].convs[2].spectral
    spectral.u[...] = jnp.ones(4) / 2  # far from converged, so the step's update shows

    def loss(model):
        real_out, fake_out = split_real_fake(model(jnp.concatenate([real, fake])), 2)
        return discriminator_hinge_loss([o.logits for o in real_out], [o.logits for o in fake_out])

    grads = nnx.jit(nnx.grad(loss))(model)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == 2 * (2 * 3 + 2 * 5)  # kernel and bias of every conv
    for path, g in flat:
        assert np.all(np.isfinite(g[...])), path
        assert np.any(g[...] != 0), path
    assert not np.allclose(spectral.u[...], 0.5, atol=1e-3)  # the power-iteration step came out
