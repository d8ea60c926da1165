"""DP noise and Poisson sampling the coordinator cannot predict: a site-local CSPRNG.

A deployed site keeps a 256-bit secret, drawn once from ``os.urandom`` and
stored mode 0600 at ``<site-dir>/keys/noise-secret``. For every (run, round)
and purpose ("noise", "sampling") it derives a fresh 256-bit key with HKDF-SHA256
and expands it with the ChaCha20 stream cipher (both from ``cryptography``):

* uniforms: 64-bit words of the keystream, 52 bits each, as doubles in (0, 1];
* Gaussians: Box-Muller on consecutive pairs of those uniforms (on the
  training device);
* Poisson sampling: record i joins a step's batch iff its uniform is < q.

Nothing the server sends or receives enters the derivation except the run id
and round number, which only separate the streams; without the secret the
noise is a ChaCha20 keystream to the server. The seeded path (``round_seed``,
torch generators) is kept for simulations: reproducible, and predictable by
whoever knows the run config, so it gives no protection against the coordinator.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch.utils.data import Dataset, Sampler

from fedmeta.paths import NOISE_SECRET as SECRET_FILE

SECRET_BYTES = 32
SITE_CSPRNG = "site-csprng"
SEEDED = "seeded"
_SALT = b"fedmeta site noise v1"
_TWO_PI = 2.0 * math.pi


class NoiseSecretError(RuntimeError):
    """The site's noise secret is unreadable or unsafe (one line, names the file)."""


def load_or_create_secret(site_dir: Path) -> bytes:
    """The site's noise secret, created (0600, from os.urandom) on first use."""
    path = Path(site_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return load_or_create_secret(site_dir)
        try:
            os.write(fd, os.urandom(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise NoiseSecretError(
            f"{path}: mode {oct(mode)} lets others read the site's noise "
            "secret; run chmod 600 on it — refusing to train"
        )
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise NoiseSecretError(
            f"{path}: expected {SECRET_BYTES} bytes, found {len(data)}; "
            "delete it to draw a new one — refusing to train"
        )
    return data


class KeyStream:
    """Uniforms and Gaussians from one ChaCha20 keystream (key 256 bits, nonce 0)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("ChaCha20 needs a 32-byte key")
        self._enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def raw(self, n: int) -> bytearray:
        """The next ``n`` keystream bytes (ChaCha20 of zeros), in a writable buffer."""
        buf = bytearray(n + 63)
        written = self._enc.update_into(bytes(n), buf)
        assert written == n
        return buf

    def uniforms(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms in (0, 1], 52 random bits each (one 64-bit word each)."""
        words = np.frombuffer(self.raw(8 * n), dtype="<u8", count=n)
        words >>= np.uint64(12)  # 52 mantissa bits ...
        words |= np.uint64(0x3FF0000000000000)  # ... of a double in [1, 2)
        u = words.view(np.float64)
        np.subtract(2.0, u, out=u)  # (0, 1]: never 0, so log(u) is finite
        return u

    def normals(
        self, n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """``n`` standard normals by Box-Muller on consecutive pairs of uniforms.

        The radius sqrt(-2 ln u1) is computed in float64 (tails to ~8.5 sigma), then
        both factors in ``dtype`` on ``device``; the stream is prefix-stable.
        """
        m = (n + 1) // 2
        u = torch.from_numpy(self.uniforms(2 * m)).to(device).view(m, 2)
        r = torch.sqrt(-2.0 * torch.log(u[:, 0])).to(dtype)
        theta = (_TWO_PI * u[:, 1]).to(dtype)
        return torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=1).reshape(-1)[:n]


def derive_key(secret: bytes, run_id: str, server_round: int, purpose: str) -> bytes:
    """HKDF-SHA256(secret; info = purpose|run|round): one key per stream."""
    info = f"{purpose}|{run_id}|{int(server_round)}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(secret)


class SiteRandomness:
    """The two streams of one (run, round) at one site: DP noise and Poisson sampling."""

    source = SITE_CSPRNG

    def __init__(self, secret: bytes, run_id: str, server_round: int) -> None:
        self.noise = KeyStream(derive_key(secret, run_id, server_round, "noise"))
        self.sampling = KeyStream(derive_key(secret, run_id, server_round, "sampling"))

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """Noise N(0, std^2) shaped like ``reference`` (its device and dtype)."""
        if std == 0:
            return torch.zeros_like(reference)
        z = self.noise.normals(reference.numel(), reference.dtype, reference.device)
        return z.view(reference.shape).mul_(std)


class PoissonSampler(Sampler[list[int]]):
    """Opacus's ``UniformWithReplacementSampler`` with its coin flips from a keystream."""

    def __init__(self, num_samples: int, sample_rate: float, stream: KeyStream) -> None:
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.stream = stream
        self.steps = int(1 / sample_rate)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.stream.uniforms(self.num_samples) < self.sample_rate
            yield np.flatnonzero(mask).tolist()


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    stream: KeyStream | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
):
    """An Opacus ``DPDataLoader`` (empty batches included) drawing from ``stream``, or
    taking its batches from ``batch_sampler`` (e.g. Poisson sampling over units)."""
    if batch_sampler is None:
        if stream is None:
            raise ValueError("poisson_loader needs a keystream or a batch sampler")
        batch_sampler = PoissonSampler(len(dataset), sample_rate, stream)
    return _site_loader_class()(dataset, sample_rate, batch_sampler)


_SITE_LOADER: type | None = None


def _site_loader_class() -> type:
    """Opacus's ``DPDataLoader`` with a batch sampler of ours (defined once, on first use:
    Opacus is imported only when a DP round needs it)."""
    global _SITE_LOADER
    if _SITE_LOADER is None:
        from opacus.data_loader import (
            DPDataLoader,
            dtype_safe,
            shape_safe,
            wrap_collate_with_empty,
        )
        from torch.utils.data import DataLoader, default_collate

        class SiteDPDataLoader(DPDataLoader):
            def __init__(self, dataset, sample_rate, batch_sampler) -> None:
                # DPDataLoader's own __init__, with our batch sampler
                first = dataset[0]
                self.sample_rate = sample_rate
                self.distributed = False
                DataLoader.__init__(
                    self,
                    dataset,
                    batch_sampler=batch_sampler,
                    collate_fn=wrap_collate_with_empty(
                        collate_fn=default_collate,
                        batch_first=True,
                        rand_on_empty=False,
                        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                        dtypes=[dtype_safe(x) for x in first],
                    ),
                )

        _SITE_LOADER = SiteDPDataLoader
    return _SITE_LOADER


def use_site_noise(optimizer, randomness: SiteRandomness) -> None:
    """Make an Opacus DP optimizer draw its noise from ``randomness`` (this instance only).

    Same arithmetic as Opacus's ``DPOptimizer.add_noise``: each parameter's clipped
    gradient sum plus N(0, (sigma * C)^2), processed flags checked and set.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + randomness.gaussian_like(p.summed_grad, std)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def noise_statement(noise_source: str, transport: str) -> str:
    """What a run's summary says about where its DP noise came from."""
    if transport == "simulation" and noise_source != SITE_CSPRNG:
        return (
            "seeded from the run seed at simulated sites: reproducible, for experiments "
            "only; it gives no guarantee against the coordinator (a site with its own "
            "manifest.toml always uses its CSPRNG)"
        )
    return (
        "site-csprng: each site's own secret (HKDF-SHA256 + ChaCha20); the coordinator "
        "cannot regenerate the noise"
    )
