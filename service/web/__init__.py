"""Server-rendered leaderboard pages (Jinja2 templates, one stylesheet)."""
