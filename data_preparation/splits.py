"""Which sample goes to which site and split: pure, seeded numpy functions.

Federated experiments need controlled heterogeneity between hospitals: IID (every site looks
alike), label skew (per-class site shares drawn from Dirichlet(alpha); small alpha = strong
skew) and quantity skew (site sizes drawn from Dirichlet(alpha), labels IID). The same
`np.random.Generator` drives every draw, so a seed reproduces the exact assignment.
"""

import numpy as np

from fedxvit.errors import FedXViTError

METHODS = ("iid", "dirichlet", "quantity")
MIN_PER_SITE = 2
DIRICHLET_ATTEMPTS = 100


def _class_name(label, class_names) -> str:
    return str(class_names[label]) if class_names is not None else f"label {label}"


def _check(labels: np.ndarray, n_sites: int, method: str, alpha: float, min_per_site: int) -> None:
    """Refuse requests that cannot give every site data, before any random draw."""
    if method not in METHODS:
        raise FedXViTError(f"--split {method!r} is not one of {', '.join(METHODS)}")
    if n_sites < 1:
        raise FedXViTError(f"--sites must be at least 1, got {n_sites}")
    if not alpha > 0:
        raise FedXViTError(f"--alpha must be greater than 0, got {alpha}")
    if len(labels) < n_sites * min_per_site:
        raise FedXViTError(
            f"--sites {n_sites} needs at least {n_sites * min_per_site} images "
            f"({min_per_site} per site) but only {len(labels)} were found"
        )


def _iid(labels, n_sites, rng, class_names):
    """Deal each class round-robin so every site sees every class in the same ratio."""
    parts = [[] for _ in range(n_sites)]
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < n_sites:
            raise FedXViTError(
                f"class {_class_name(label, class_names)} has {len(members)} images, fewer than "
                f"--sites {n_sites}: lower --sites or use --split dirichlet/quantity"
            )
        # rotating the start keeps the remainders from piling up on site 1
        for site, chunk in enumerate(np.array_split(members, n_sites)):
            parts[(site + offset) % n_sites].append(chunk)
        offset += len(members) % n_sites
    return parts


def _dirichlet(labels, n_sites, alpha, rng, min_per_site):
    """Label skew: each class is cut among sites by its own Dirichlet(alpha) proportions."""
    for _ in range(DIRICHLET_ATTEMPTS):
        parts = [[] for _ in range(n_sites)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_sites))[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].append(chunk)
        if min(sum(len(c) for c in chunks) for chunks in parts) >= min_per_site:
            return parts
    raise FedXViTError(
        f"--split dirichlet with --alpha {alpha} left a site with fewer than {min_per_site} images "
        f"in {DIRICHLET_ATTEMPTS} draws: raise --alpha, lower --sites or add images"
    )


def _quantity(labels, n_sites, alpha, rng, min_per_site):
    """Quantity skew: site sizes from Dirichlet(alpha) on top of a guaranteed minimum."""
    spare = len(labels) - n_sites * min_per_site
    sizes = min_per_site + rng.multinomial(spare, rng.dirichlet([alpha] * n_sites))
    shuffled = rng.permutation(len(labels))
    return [[chunk] for chunk in np.split(shuffled, np.cumsum(sizes)[:-1])]


def assign_sites(
    labels,
    n_sites: int,
    method: str = "iid",
    alpha: float = 0.5,
    rng=None,
    min_per_site: int = MIN_PER_SITE,
    class_names=None,
) -> list:
    """Split sample indices 0..len(labels)-1 into `n_sites` disjoint sorted index arrays.

    Raises FedXViTError (naming the option) when a site would get fewer than `min_per_site`.
    """
    labels = np.asarray(labels, dtype=int)
    rng = rng if rng is not None else np.random.default_rng(0)
    _check(labels, n_sites, method, alpha, min_per_site)
    if method == "iid":
        parts = _iid(labels, n_sites, rng, class_names)
    elif method == "dirichlet":
        parts = _dirichlet(labels, n_sites, alpha, rng, min_per_site)
    else:
        parts = _quantity(labels, n_sites, alpha, rng, min_per_site)
    return [np.sort(np.concatenate(chunks)).astype(int) for chunks in parts]


def train_val_test(indices, labels, val_frac: float = 0.15, test_frac: float = 0.15, rng=None) -> dict:
    """Split one site's indices into training/validation/testing, stratified by label.

    Per class, validation and testing get round(n * frac) each, but training keeps at least
    one image whenever the class has one, so no class vanishes from training.
    """
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise FedXViTError(
            f"--val-frac {val_frac} and --test-frac {test_frac} must each be in [0, 1) and sum to less than 1"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    indices = np.asarray(indices, dtype=int)
    labels = np.asarray(labels, dtype=int)
    out = {"training": [], "validation": [], "testing": []}
    for label in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == label])
        n_test = min(int(round(len(members) * test_frac)), len(members) - 1)
        n_val = min(int(round(len(members) * val_frac)), len(members) - 1 - n_test)
        out["testing"].append(members[:n_test])
        out["validation"].append(members[n_test : n_test + n_val])
        out["training"].append(members[n_test + n_val :])
    return {
        split: np.sort(np.concatenate(chunks)).astype(int) if chunks else np.zeros(0, int)
        for split, chunks in out.items()
    }
