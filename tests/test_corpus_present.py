from conftest import MANIFEST, require_corpus


def test_corpus_is_present() -> None:
    """Parametrized corpus tests collect nothing without the corpus: under CI that must fail."""
    require_corpus()
    assert len(MANIFEST) >= 100
