"""MethodContext: the one place where a method's sample counts are resolved."""

from __future__ import annotations

from dataclasses import replace

from methods.context import SampleCounts
from methods.kfac import KFACInfluence
from methods.trak import TRAKConfig


def test_sample_counts_take_the_config_where_set_else_the_context(smoke_context):
    ctx = replace(smoke_context, grad_samples=5, query_samples=6, fit_samples=7)
    assert ctx.sample_counts() == SampleCounts(grad=5, query=6, fit=7)
    assert ctx.sample_counts(KFACInfluence.Config()) == SampleCounts(grad=5, query=6, fit=7)
    kfac = KFACInfluence.Config(grad_samples=2, query_samples=3, fit_samples=4)
    assert ctx.sample_counts(kfac) == SampleCounts(grad=2, query=3, fit=4)
    # TRAK has no fit_samples field: the context's applies
    assert ctx.sample_counts(TRAKConfig(query_samples=9)) == SampleCounts(grad=5, query=9, fit=7)
