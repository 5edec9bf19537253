"""lookalike.pipeline"""
