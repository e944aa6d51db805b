"""Pure renderers: analysis results -> self-contained HTML. No model code here; imported lazily."""
