"""How the command line names an endpoint (`freemark.cli.endpoints.split_endpoint`)."""

from __future__ import annotations

import pytest

from freemark.cli.endpoints import split_endpoint
from freemark.errors import InvalidInputError


def test_the_model_comes_from_the_option_or_from_the_models_url() -> None:
    assert split_endpoint("http://h:8080", "mnist") == ("http://h:8080", "mnist")
    assert split_endpoint("http://h:8080/v2/models/mnist", None) == ("http://h:8080", "mnist")
    assert split_endpoint("https://h/prefix/v2/models/m-1/", None) == ("https://h/prefix", "m-1")
    with pytest.raises(InvalidInputError, match="--endpoint-model"):
        split_endpoint("http://h:8080", None)
