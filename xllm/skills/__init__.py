"""Skills: typed Python functions the model calls (LLaVA-Plus's skills, OpenAI's function calling), run by a loop
that checks arguments, bounds time and rounds, and turns every failure into text for the model (docs/skills.md).

    answer = model.chat(messages, media, tools=[locate, measure])   # a `SkillChat`: .answer, .calls, .turns
"""

from xllm.skills.catalog import SkillNotFound, find_skill, installed_skills
from xllm.skills.constrain import CallConstraint, RowConstraints
from xllm.skills.loop import SkillCall, SkillChat, chat_with_skills
from xllm.skills.skill import Skill, SkillOutput, SkillResult, skill_schema

__all__ = ["CallConstraint", "RowConstraints", "Skill", "SkillCall", "SkillChat", "SkillNotFound", "SkillOutput",
           "SkillResult", "chat_with_skills", "find_skill", "installed_skills", "skill_schema"]
