"""The app's views, one module each with `render(ctx)`; only the chosen one runs."""
