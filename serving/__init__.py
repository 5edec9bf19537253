"""lookalike.serving"""
