"""Template tags: ``{% load realtime %}{% realtime_script %}``."""

from __future__ import annotations

from django import template
from django.templatetags.static import static
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()


@register.simple_tag
def realtime_script() -> SafeString:
    """The script tag of the browser client (static/realtime/realtime.js)."""
    return format_html('<script src="{}"></script>', static("realtime/realtime.js"))
