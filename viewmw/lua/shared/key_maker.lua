-- Shared by the scripts that fill key templates (snapshot.lua, settle.lua): scripts.py puts
-- it in place of their "-- include: key_maker" line.
-- Fills a (type, id) template (or (type, day)) as string.format would, one concatenation per
-- key: per type, the template is formatted twice with a one-byte second value ('\1', '\2'),
-- and the texts before and after the place where the two differ are kept.
local function key_maker(template)
  local parts = {}
  return function(content_type, second)
    local part = parts[content_type]
    if not part then
      local one = string.format(template, content_type, '\1')
      local two = string.format(template, content_type, '\2')
      local at = 1
      while string.byte(one, at) == string.byte(two, at) do
        at = at + 1
      end
      part = {string.sub(one, 1, at - 1), string.sub(one, at + 1)}
      parts[content_type] = part
    end
    return part[1] .. second .. part[2]
  end
end
