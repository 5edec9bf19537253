"""lookalike.model"""
