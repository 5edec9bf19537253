"""lookalike.index"""
