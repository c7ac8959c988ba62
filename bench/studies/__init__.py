"""Reproduction studies: the original table on both stacks (reproduce, side_by_side), the recipe's ablation ladder (recipe), the spread over seeds (seed_spread)."""
