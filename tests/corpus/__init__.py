"""The odd-input corpus of issue 13: small hostile or unusual inputs built at test time, with what
``refstream run`` (and a service job) must do with each. See :mod:`tests.corpus.build` (imported by
``tests/test_corpus.py`` and ``tests/test_corpus_service.py`` as ``corpus.build``)."""
