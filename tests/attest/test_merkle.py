"""RFC 6962 / 9162 tree hashing and proofs against the published transparency-dev vectors, plus every proof of
every small tree generated and verified, and every single-bit corruption of them refused."""
import base64
import json
from pathlib import Path

import pytest

from ccserve.attest import merkle
from ccserve.attest.errors import InvalidProof

VECTORS = json.loads((Path(__file__).parent / "vectors" / "merkle_proofs.json").read_text())
# testonly.LeafInputs() and testonly.RootHashes() of github.com/transparency-dev/merkle
LEAF_INPUTS = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                          "606162636465666768696a6b6c6d6e6f"]]
ROOTS = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
         "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
LEAVES = [merkle.leaf_hash(d) for d in LEAF_INPUTS]


def b64(s):
    return base64.b64decode(s)


def test_roots_of_the_standard_eight_leaves():
    assert [merkle.root(LEAVES[:n]).hex() for n in range(9)] == ROOTS


def test_vector_file_is_complete():
    assert len(VECTORS["inclusion"]) == 98 and len(VECTORS["consistency"]) == 98
    assert sum(not c["wantErr"] for c in VECTORS["inclusion"] + VECTORS["consistency"]) >= 10


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: c["file"])
def test_inclusion_vectors(case):
    args = (case["leafIdx"], case["treeSize"], b64(case["leafHash"]), [b64(p) for p in case["proof"] or []],
            b64(case["root"]))
    if case["wantErr"]:
        with pytest.raises(InvalidProof):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize("case", VECTORS["consistency"], ids=lambda c: c["file"])
def test_consistency_vectors(case):
    args = (case["size1"], case["size2"], b64(case["root1"]), b64(case["root2"]),
            [b64(p) for p in case["proof"] or []])
    if case["wantErr"]:
        with pytest.raises(InvalidProof):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def test_generated_proofs_equal_the_published_ones():
    """Our proof generation, on the standard leaves, gives exactly the upstream happy-path proofs."""
    checked = 0
    for case in VECTORS["inclusion"]:
        if not case["wantErr"] and case["treeSize"] <= 8 and b64(case["leafHash"]) in LEAVES:
            proof = merkle.inclusion_proof(case["leafIdx"], LEAVES[:case["treeSize"]])
            assert proof == [b64(p) for p in case["proof"] or []], case["file"]
            checked += 1
    for case in VECTORS["consistency"]:
        if not case["wantErr"] and 0 < case["size1"] <= case["size2"] <= 8 and \
                b64(case["root2"]) == merkle.root(LEAVES[:case["size2"]]):
            assert merkle.consistency_proof(case["size1"], LEAVES[:case["size2"]]) == \
                [b64(p) for p in case["proof"] or []], case["file"]
            checked += 1
    assert checked >= 9


def _flips(proof):
    for i in range(len(proof)):
        for bit in (0, 7, 255):
            bad = list(proof)
            bad[i] = bytes([bad[i][0] ^ (1 << (bit % 8))]) + bad[i][1:] if bit < 8 else bad[i][:-1] + \
                bytes([bad[i][-1] ^ 1])
            yield bad


def test_every_proof_of_small_trees_verifies_and_no_corruption_does():
    leaves = [merkle.leaf_hash(i.to_bytes(2, "big")) for i in range(33)]
    for n in range(1, 34):
        tree, r = leaves[:n], merkle.root(leaves[:n])
        for i in range(n):
            proof = merkle.inclusion_proof(i, tree)
            merkle.verify_inclusion(i, n, tree[i], proof, r)
            for bad in _flips(proof):
                with pytest.raises(InvalidProof):
                    merkle.verify_inclusion(i, n, tree[i], bad, r)
            with pytest.raises(InvalidProof):
                merkle.verify_inclusion(i, n, leaves[(i + 1) % 33], proof, r)
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(m, tree)
            merkle.verify_consistency(m, n, merkle.root(tree[:m]), r, proof)
            for bad in _flips(proof):
                with pytest.raises(InvalidProof):
                    merkle.verify_consistency(m, n, merkle.root(tree[:m]), r, bad)


def test_a_rewritten_history_has_no_consistency_proof():
    """A log that dropped entry 2 and appended another cannot prove it extends what a client saw."""
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(6)]
    rewritten = leaves[:2] + leaves[3:] + [merkle.leaf_hash(b"new")]
    with pytest.raises(InvalidProof):
        merkle.verify_consistency(4, 6, merkle.root(leaves[:4]), merkle.root(rewritten),
                                  merkle.consistency_proof(4, rewritten))


def test_proof_requests_outside_the_tree_are_refused():
    with pytest.raises(ValueError):
        merkle.inclusion_proof(3, LEAVES[:3])
    with pytest.raises(ValueError):
        merkle.consistency_proof(0, LEAVES[:3])
    with pytest.raises(ValueError):
        merkle.consistency_proof(4, LEAVES[:3])
