from afina.api.deps import parse_api_keys


def test_keys_map_to_their_project_and_bare_keys_to_default():
    assert parse_api_keys(["alpha:k1", "k2", "beta:k:with:colons"]) == {
        "k1": "alpha",
        "k2": "default",
        "k:with:colons": "beta",
    }
